//! `origin enroll`, server side: a one-time token that any origin sharing the store redeems.

// CommandError carries the policy's own errors whole (see `commands`).
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;

use proto::net::{EnrollToken, PeerIdentity, Role, ServerPin, Site};
use proto::wire::ControlReply;

use super::{utc, CommandError, ControlPlane};
use crate::db::{Audit, Put};
use crate::tokens::TokenRecord;

/// What a token names: where this origin enrolls and the CA every origin's certificate chains
/// to. Set once the enrollment endpoint listens.
#[derive(Clone, Debug)]
pub struct Enrollment {
    /// This origin's enrollment address (first in its tokens).
    pub addr: SocketAddr,
    /// BLAKE3 of the mesh CA's certificate.
    pub ca_fingerprint: [u8; 32],
    /// This origin's node id (recorded as the issuer).
    pub node_id: String,
}

impl ControlPlane {
    /// Says where this origin enrolls; `origin enroll` refuses until it is set.
    pub fn set_enrollment(&self, enrollment: Enrollment) {
        let _ = self.enrollment.set(enrollment);
    }

    pub(super) fn enroll_token(
        &self,
        peer: &PeerIdentity,
        role: &str,
        site: &str,
        who: impl Fn(&str, String) -> Audit,
    ) -> Result<ControlReply, CommandError> {
        if peer.role != Role::Origin {
            return Err(CommandError::TokensNeedOrigin);
        }
        let role: Role = role
            .parse()
            .map_err(|e: proto::role::UnknownRole| CommandError::Token(e.to_string()))?;
        if !matches!(role, Role::Stager | Role::Edge) {
            return Err(CommandError::Token(
                "only stager and edge nodes enroll with tokens".to_owned(),
            ));
        }
        let site = Site::new(site).map_err(|e| CommandError::Token(e.to_string()))?;
        let Some(enrollment) = self.enrollment.get() else {
            return Err(CommandError::Token(
                "this origin's enrollment endpoint is not up yet; try again".to_owned(),
            ));
        };
        // This origin first, then every other origin up, so the node enrolls at whichever
        // answers.
        let mut addrs = vec![enrollment.addr];
        match self.db.origins() {
            Ok(origins) => addrs.extend(
                origins
                    .iter()
                    .filter(|origin| origin.node_id != enrollment.node_id)
                    .filter_map(|origin| origin.enroll.parse::<SocketAddr>().ok())
                    .filter(|addr| !addr.ip().is_unspecified()),
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot list the origins up; the token names only this one")
            }
        }
        // Issuing is when the table grows: what expired unredeemed goes first.
        if let Err(error) = crate::tokens::prune_expired(&self.db) {
            tracing::warn!(%error, "cannot remove the expired enrollment tokens; they stay until the next `origin enroll`");
        }
        let token = EnrollToken::new(
            addrs,
            ServerPin::Ca(enrollment.ca_fingerprint),
            role,
            site.clone(),
        );
        let record = TokenRecord::new(&token.secret, role, &site, &enrollment.node_id);
        let detail = format!(
            "one-time token {} for {} in {site}, valid until {}, redeemable at {}",
            record.short(),
            crate::tokens::a_role(role.as_str()),
            utc(record.expires_unix_s * 1000),
            token
                .enroll_addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let expires = record.expires_unix_s;
        self.db.commit(
            &[Put::Token(Box::new(record))],
            Some(who("token.issue", detail)),
        )?;
        let text = token.encode();
        Ok(ControlReply {
            success: true,
            json: serde_json::json!({
                "token": text,
                "role": role.as_str(),
                "site": site.as_str(),
                "expires_unix_s": expires,
                "enroll_addrs": token.enroll_addrs,
            })
            .to_string(),
            text: format!("{text}\n"),
        })
    }
}
