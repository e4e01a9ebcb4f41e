//! Who may send which request to whom: the one table every mesh server consults before it
//! dispatches a request, so the origin, the stager and the edge daemon cannot drift apart.
//!
//! The table speaks of roles only. Checks that need more of the peer's certificate (an edge
//! serves only edges of its own site; only the node itself may make its daemon negotiate) stay
//! with the server, after [`authorize`] said yes.

use std::fmt;

use super::messages::{ErrorCode, Request};
use crate::role::Role;

/// A [`Request`]'s kind, without its fields: the rows of the authorization table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestKind {
    /// [`Request::ListBundles`].
    ListBundles,
    /// [`Request::Resolve`].
    Resolve,
    /// [`Request::GetManifest`].
    GetManifest,
    /// [`Request::GetBlob`].
    GetBlob,
    /// [`Request::PutBlob`].
    PutBlob,
    /// [`Request::Publish`].
    Publish,
    /// [`Request::Subscribe`].
    Subscribe,
    /// [`Request::Enroll`].
    Enroll,
    /// [`Request::SitePeers`].
    SitePeers,
    /// [`Request::Fetch`].
    Fetch,
    /// [`Request::StartSwap`].
    StartSwap,
    /// [`Request::ReportNode`].
    ReportNode,
    /// [`Request::RelayReport`].
    RelayReport,
    /// [`Request::Control`].
    Control,
    /// [`Request::TestRun`].
    TestRun,
    /// [`Request::Negotiate`].
    Negotiate,
    /// [`Request::KeepSet`].
    KeepSet,
    /// [`Request::RelayKeepSet`].
    RelayKeepSet,
    /// [`Request::ContentKeys`].
    ContentKeys,
    /// [`Request::StagerStats`].
    StagerStats,
    /// [`Request::SwapStatus`].
    SwapStatus,
    /// [`Request::SiblingFlights`].
    SiblingFlights,
    /// [`Request::StagerAddress`].
    StagerAddress,
}

impl RequestKind {
    /// Every kind, in the order of [`Request`]'s variants.
    pub const ALL: [RequestKind; 23] = [
        RequestKind::ListBundles,
        RequestKind::Resolve,
        RequestKind::GetManifest,
        RequestKind::GetBlob,
        RequestKind::PutBlob,
        RequestKind::Publish,
        RequestKind::Subscribe,
        RequestKind::Enroll,
        RequestKind::SitePeers,
        RequestKind::Fetch,
        RequestKind::StartSwap,
        RequestKind::ReportNode,
        RequestKind::RelayReport,
        RequestKind::Control,
        RequestKind::TestRun,
        RequestKind::Negotiate,
        RequestKind::KeepSet,
        RequestKind::RelayKeepSet,
        RequestKind::ContentKeys,
        RequestKind::StagerStats,
        RequestKind::SwapStatus,
        RequestKind::SiblingFlights,
        RequestKind::StagerAddress,
    ];

    /// The variant's name, as in the protocol (`PutBlob`).
    pub fn name(self) -> &'static str {
        match self {
            RequestKind::ListBundles => "ListBundles",
            RequestKind::Resolve => "Resolve",
            RequestKind::GetManifest => "GetManifest",
            RequestKind::GetBlob => "GetBlob",
            RequestKind::PutBlob => "PutBlob",
            RequestKind::Publish => "Publish",
            RequestKind::Subscribe => "Subscribe",
            RequestKind::Enroll => "Enroll",
            RequestKind::SitePeers => "SitePeers",
            RequestKind::Fetch => "Fetch",
            RequestKind::StartSwap => "StartSwap",
            RequestKind::ReportNode => "ReportNode",
            RequestKind::RelayReport => "RelayReport",
            RequestKind::Control => "Control",
            RequestKind::TestRun => "TestRun",
            RequestKind::Negotiate => "Negotiate",
            RequestKind::KeepSet => "KeepSet",
            RequestKind::RelayKeepSet => "RelayKeepSet",
            RequestKind::StagerStats => "StagerStats",
            RequestKind::SwapStatus => "SwapStatus",
            RequestKind::SiblingFlights => "SiblingFlights",
            RequestKind::StagerAddress => "StagerAddress",
            RequestKind::ContentKeys => "ContentKeys",
        }
    }

    /// What the request asks, for people ("upload blobs").
    pub fn action(self) -> &'static str {
        match self {
            RequestKind::ListBundles => "list bundles",
            RequestKind::Resolve => "resolve bundle names",
            RequestKind::GetManifest => "fetch manifests",
            RequestKind::GetBlob => "fetch blobs",
            RequestKind::PutBlob => "upload blobs",
            RequestKind::Publish => "publish",
            RequestKind::Subscribe => "subscribe to announcements",
            RequestKind::Enroll => "enroll",
            RequestKind::SitePeers => "join the site's peer list",
            RequestKind::Fetch => "ask for a fetch",
            RequestKind::StartSwap => "start a swap",
            RequestKind::ReportNode => "report as an edge",
            RequestKind::RelayReport => "relay an edge's report",
            RequestKind::Control => "run control-plane commands",
            RequestKind::TestRun => "start a test run",
            RequestKind::Negotiate => "make a node negotiate",
            RequestKind::KeepSet => "ask which bundles to keep",
            RequestKind::RelayKeepSet => "relay an edge's keep-set request",
            RequestKind::ContentKeys => "receive content keys",
            RequestKind::StagerStats => "report a stager's traffic",
            RequestKind::SwapStatus => "ask how a swap stands",
            RequestKind::SiblingFlights => "follow a sibling stager's upstream pulls",
            RequestKind::StagerAddress => "tell where a stager serves its site",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Request {
    /// This request's row in the authorization table.
    pub fn kind(&self) -> RequestKind {
        match self {
            Request::ListBundles => RequestKind::ListBundles,
            Request::Resolve { .. } => RequestKind::Resolve,
            Request::GetManifest { .. } => RequestKind::GetManifest,
            Request::GetBlob { .. } => RequestKind::GetBlob,
            Request::PutBlob { .. } => RequestKind::PutBlob,
            Request::Publish { .. } => RequestKind::Publish,
            Request::Subscribe { .. } => RequestKind::Subscribe,
            Request::Enroll { .. } => RequestKind::Enroll,
            Request::SitePeers { .. } => RequestKind::SitePeers,
            Request::Fetch { .. } => RequestKind::Fetch,
            Request::StartSwap { .. } => RequestKind::StartSwap,
            Request::ReportNode { .. } => RequestKind::ReportNode,
            Request::RelayReport { .. } => RequestKind::RelayReport,
            Request::Control { .. } => RequestKind::Control,
            Request::TestRun { .. } => RequestKind::TestRun,
            Request::Negotiate => RequestKind::Negotiate,
            Request::KeepSet => RequestKind::KeepSet,
            Request::RelayKeepSet { .. } => RequestKind::RelayKeepSet,
            Request::ContentKeys => RequestKind::ContentKeys,
            Request::StagerStats { .. } => RequestKind::StagerStats,
            Request::SwapStatus { .. } => RequestKind::SwapStatus,
            Request::SiblingFlights => RequestKind::SiblingFlights,
            Request::StagerAddress { .. } => RequestKind::StagerAddress,
        }
    }
}

/// Which peers a server takes one kind of request from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// This server does not answer the request at all: it is for another role's server (or,
    /// for [`RequestKind::Enroll`], for the enrollment endpoint). Refused as
    /// [`ErrorCode::BadRequest`].
    NotServed,
    /// Peers of these roles may send it; any other is refused as [`ErrorCode::Forbidden`].
    /// Empty: the server refuses it from every peer.
    From(&'static [Role]),
}

impl Access {
    /// True when a peer of `peer`'s role may send the request.
    pub fn allows(self, peer: Role) -> bool {
        match self {
            Access::NotServed => false,
            Access::From(roles) => roles.contains(&peer),
        }
    }
}

const ANY: Access = Access::From(&Role::ALL);
const NOBODY: Access = Access::From(&[]);
const NO: Access = Access::NotServed;
const ORIGIN: Access = Access::From(&[Role::Origin]);
const PUBLISHER: Access = Access::From(&[Role::Publisher]);
const STAGER: Access = Access::From(&[Role::Stager]);
const EDGE: Access = Access::From(&[Role::Edge]);
const OPERATOR: Access = Access::From(&[Role::Origin, Role::Publisher]);
const ORIGIN_OR_EDGE: Access = Access::From(&[Role::Origin, Role::Edge]);
const STAGER_OR_EDGE: Access = Access::From(&[Role::Stager, Role::Edge]);

/// The table: who may send `request` to a server of role `server`.
///
/// Publishers run no server, so every request to one is [`Access::NotServed`].
pub fn access(server: Role, request: RequestKind) -> Access {
    use RequestKind as K;
    // Columns: the origin, a stager, an edge daemon.
    let [origin, stager, edge] = match request {
        K::ListBundles => [ANY, ANY, NO],
        K::Resolve => [ANY, ANY, NO],
        K::GetManifest => [ANY, ANY, EDGE],
        K::GetBlob => [ANY, ANY, EDGE],
        // Uploads go to the origin only; a stager refuses them outright.
        K::PutBlob => [PUBLISHER, NOBODY, NO],
        K::Publish => [PUBLISHER, NOBODY, NO],
        // A stager relays the announcements of its own upstream to the stagers below it (a
        // regional stager to its sites' stagers).
        K::Subscribe => [ANY, STAGER, NO],
        // Enrollment has its own endpoint; no mesh server answers it.
        K::Enroll => [NO, NO, NO],
        K::SitePeers => [NO, EDGE, EDGE],
        // The edge itself (its `fetch` command) or the origin.
        K::Fetch => [NO, NO, ORIGIN_OR_EDGE],
        K::StartSwap => [NO, NO, ORIGIN],
        K::SwapStatus => [NO, NO, ORIGIN],
        // Another stager of the same site (the stager checks the site).
        K::SiblingFlights => [NO, STAGER, NO],
        K::ReportNode => [EDGE, EDGE, NO],
        K::RelayReport => [STAGER, NO, NO],
        K::Control => [OPERATOR, NO, NO],
        K::TestRun => [NO, NO, ORIGIN],
        // Only the node itself, which the daemon checks by node id.
        K::Negotiate => [NO, NO, EDGE],
        // A stager asks for its site's keep-set and an edge for its own; a stager passes its
        // edges' requests on.
        K::KeepSet => [STAGER_OR_EDGE, EDGE, NO],
        K::RelayKeepSet => [STAGER, NO, NO],
        // Content keys come from the origin only, to edges only (the origin then checks the
        // node is enrolled, not revoked, and of a class that may read). A stager never holds
        // one, so it neither asks nor relays.
        K::ContentKeys => [EDGE, NO, NO],
        // A stager's traffic figures, for the origin's console.
        K::StagerStats => [STAGER, NO, NO],
        // Where a stager serves its site, for the origin's enrollment answers.
        K::StagerAddress => [STAGER, NO, NO],
    };
    match server {
        Role::Origin => origin,
        Role::Stager => stager,
        Role::Edge => edge,
        Role::Publisher => NO,
    }
}

/// Decides whether a server of role `server` takes `request` from a peer of role `peer`.
/// Servers call it before they dispatch, and answer a refusal with
/// [`Refusal::response`].
pub fn authorize(server: Role, peer: Role, request: &Request) -> Result<(), Refusal> {
    let request = request.kind();
    let access = access(server, request);
    if access.allows(peer) {
        Ok(())
    } else {
        Err(Refusal {
            server,
            peer,
            request,
            access,
        })
    }
}

/// Why a server refused a request: which request, from which role, to which server role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The refusing server's role.
    pub server: Role,
    /// The peer's role, from its certificate.
    pub peer: Role,
    /// What the peer asked.
    pub request: RequestKind,
    /// What the table says about it.
    pub access: Access,
}

impl Refusal {
    /// The machine-readable reason: [`ErrorCode::BadRequest`] for a request this server does
    /// not answer, [`ErrorCode::Forbidden`] for one the peer's role may not send.
    pub fn code(&self) -> ErrorCode {
        match self.access {
            Access::NotServed => ErrorCode::BadRequest,
            Access::From(_) => ErrorCode::Forbidden,
        }
    }

    /// True when the peer's role is the reason (as opposed to a request for another server).
    pub fn is_forbidden(&self) -> bool {
        self.code() == ErrorCode::Forbidden
    }

    /// The answer to send: [`super::Response::Error`] with [`Refusal::code`] and this message.
    pub fn response(&self) -> super::Response {
        super::Response::Error {
            code: self.code(),
            message: self.to_string(),
        }
    }

    /// Adds where the request would be taken from this peer, if anywhere.
    fn write_elsewhere(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let elsewhere: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|&server| {
                server != self.server && access(server, self.request).allows(self.peer)
            })
            .map(Role::with_article)
            .collect();
        if elsewhere.is_empty() {
            return Ok(());
        }
        write!(f, "; send it to {}", elsewhere.join(" or "))
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (request, server) = (self.request, self.server.with_article());
        match self.access {
            Access::From(allowed) if !allowed.is_empty() => write!(
                f,
                "{} certificate may not {} ({request}) on {server}; only the {} {} may",
                self.peer.with_article(),
                request.action(),
                role_list(allowed),
                if allowed.len() == 1 { "role" } else { "roles" },
            ),
            Access::From(_) => {
                write!(
                    f,
                    "{server} takes {request} ({}) from no one",
                    request.action()
                )?;
                self.write_elsewhere(f)
            }
            Access::NotServed => {
                write!(f, "{request} is not a request for {server}")?;
                self.write_elsewhere(f)
            }
        }
    }
}

/// "publisher", "origin or publisher", "origin, stager or edge".
fn role_list(roles: &[Role]) -> String {
    let names: Vec<&str> = roles.iter().map(|role| role.as_str()).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_owned(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::BlobHash;
    use crate::wire::{encode_frame, ControlCommand, LENGTH_PREFIX_BYTES, VERSION_BYTES};

    /// One request of every kind, in variant order.
    fn one_of_each() -> Vec<Request> {
        let hash = BlobHash::of(b"x");
        let report = crate::wire::NodeReport {
            event: crate::wire::ReportEvent::Started,
            inventory: Default::default(),
            installed: Vec::new(),
            held: Vec::new(),
            data_addr: String::new(),
        };
        vec![
            Request::ListBundles,
            Request::Resolve {
                name: "os".into(),
                version: None,
            },
            Request::GetManifest { id: hash },
            Request::GetBlob {
                hash,
                size: 1,
                groups: vec![(0, 1)],
            },
            Request::PutBlob {
                hash,
                data: b"x".to_vec(),
            },
            Request::Publish {
                manifest: crate::manifest::tests::sample_manifest()
                    .sign(&ed25519_dalek::SigningKey::from_bytes(&[7; 32])),
            },
            Request::Subscribe { after_seq: 0 },
            Request::Enroll {
                secret: [0; 32],
                csr_pem: String::new(),
            },
            Request::SitePeers {
                data_addr: String::new(),
                p2p_addrs: Vec::new(),
                have: Vec::new(),
            },
            Request::Fetch {
                bundle: "os".into(),
            },
            Request::StartSwap {
                target: hash,
                rescue: hash,
            },
            Request::ReportNode {
                report: report.clone(),
                negotiate: true,
            },
            Request::RelayReport {
                node_id: "n".into(),
                report,
                negotiate: false,
            },
            Request::Control {
                actor: "alice".into(),
                command: ControlCommand::Nodes,
            },
            Request::TestRun { bundle: hash },
            Request::Negotiate,
            Request::KeepSet,
            Request::RelayKeepSet {
                node_id: "n".into(),
            },
            Request::ContentKeys,
            Request::StagerStats {
                served_bytes: 1,
                pulled_bytes: 2,
            },
            Request::SwapStatus { target: hash },
            Request::SiblingFlights,
            Request::StagerAddress {
                data_addr: "127.0.0.1:7410".into(),
            },
        ]
    }

    /// What each server did before the table, written out server by server: `None` when it
    /// answers, else the error code it refuses with.
    fn as_the_servers_did(server: Role, peer: Role, kind: RequestKind) -> Option<ErrorCode> {
        use ErrorCode::{BadRequest, Forbidden};
        use RequestKind as K;
        let only = |roles: &[Role]| (!roles.contains(&peer)).then_some(Forbidden);
        match server {
            Role::Origin => match kind {
                K::ListBundles | K::Resolve | K::GetManifest | K::GetBlob | K::Subscribe => None,
                K::PutBlob | K::Publish => only(&[Role::Publisher]),
                K::ReportNode => only(&[Role::Edge]),
                K::RelayReport | K::RelayKeepSet | K::StagerStats | K::StagerAddress => {
                    only(&[Role::Stager])
                }
                K::KeepSet => only(&[Role::Stager, Role::Edge]),
                K::ContentKeys => only(&[Role::Edge]),
                K::Control => only(&[Role::Origin, Role::Publisher]),
                _ => Some(BadRequest),
            },
            Role::Stager => match kind {
                K::ListBundles | K::Resolve | K::GetManifest | K::GetBlob => None,
                K::PutBlob | K::Publish => Some(Forbidden),
                K::SitePeers | K::ReportNode | K::KeepSet => only(&[Role::Edge]),
                // Since issue 15: stagers below this one subscribe through it, and siblings
                // follow its upstream pulls.
                K::Subscribe | K::SiblingFlights => only(&[Role::Stager]),
                _ => Some(BadRequest),
            },
            Role::Edge => match kind {
                K::GetBlob | K::GetManifest | K::SitePeers | K::Negotiate => only(&[Role::Edge]),
                K::Fetch => only(&[Role::Origin, Role::Edge]),
                K::TestRun | K::StartSwap | K::SwapStatus => only(&[Role::Origin]),
                _ => Some(BadRequest),
            },
            Role::Publisher => Some(BadRequest),
        }
    }

    #[test]
    fn kinds_follow_the_request_variants() {
        let requests = one_of_each();
        assert_eq!(requests.len(), RequestKind::ALL.len());
        for (index, (request, kind)) in requests.iter().zip(RequestKind::ALL).enumerate() {
            assert_eq!(request.kind(), kind);
            // The variant index on the wire is the kind's place in `ALL`.
            let frame = encode_frame(request).expect("encode");
            assert_eq!(
                usize::from(frame[LENGTH_PREFIX_BYTES + VERSION_BYTES]),
                index
            );
            assert!(format!("{request:?}").starts_with(kind.name()), "{kind}");
        }
    }

    #[test]
    fn every_request_from_every_role_to_every_server() {
        for server in Role::ALL {
            for peer in Role::ALL {
                for request in one_of_each() {
                    let kind = request.kind();
                    let got = authorize(server, peer, &request).err();
                    assert_eq!(
                        got.map(|refusal| refusal.code()),
                        as_the_servers_did(server, peer, kind),
                        "{kind} from {peer} to {server}"
                    );
                    let Some(refusal) = got else { continue };
                    let message = refusal.to_string();
                    assert!(message.contains(kind.name()), "{message}");
                    assert!(message.contains(server.as_str()), "{message}");
                    if refusal.is_forbidden() {
                        let (code, text) = match refusal.response() {
                            crate::wire::Response::Error { code, message } => (code, message),
                            other => panic!("not an error: {other:?}"),
                        };
                        assert_eq!((code, text), (ErrorCode::Forbidden, message.clone()));
                    }
                }
            }
        }
    }

    #[test]
    fn refusals_say_who_may_and_where_to_go() {
        let put = Request::PutBlob {
            hash: BlobHash::of(b"x"),
            data: b"x".to_vec(),
        };
        let edge_upload = authorize(Role::Origin, Role::Edge, &put).expect_err("edge upload");
        assert_eq!(
            edge_upload.to_string(),
            "an edge certificate may not upload blobs (PutBlob) on an origin; only the \
             publisher role may"
        );
        let to_stager = authorize(Role::Stager, Role::Publisher, &put).expect_err("stager");
        assert_eq!(
            to_stager.to_string(),
            "a stager takes PutBlob (upload blobs) from no one; send it to an origin"
        );
        let control = Request::Control {
            actor: "bob".into(),
            command: ControlCommand::Nodes,
        };
        let by_stager = authorize(Role::Origin, Role::Stager, &control).expect_err("stager");
        assert!(
            by_stager
                .to_string()
                .ends_with("only the origin or publisher roles may"),
            "{by_stager}"
        );
        let subscribe = Request::Subscribe { after_seq: 0 };
        authorize(Role::Stager, Role::Stager, &subscribe).expect("a stager below subscribes");
        let not_here = authorize(Role::Edge, Role::Stager, &subscribe).expect_err("edge");
        assert_eq!(not_here.code(), ErrorCode::BadRequest);
        assert_eq!(
            not_here.to_string(),
            "Subscribe is not a request for an edge; send it to an origin or a stager"
        );
        let edge_subscribes = authorize(Role::Stager, Role::Edge, &subscribe).expect_err("edge");
        assert_eq!(edge_subscribes.code(), ErrorCode::Forbidden);
        let enroll = Request::Enroll {
            secret: [0; 32],
            csr_pem: String::new(),
        };
        let nowhere = authorize(Role::Origin, Role::Edge, &enroll).expect_err("enroll");
        assert_eq!(nowhere.to_string(), "Enroll is not a request for an origin");
    }

    #[test]
    fn content_keys_go_from_the_origin_to_edges_only() {
        let keys = Request::ContentKeys;
        assert!(authorize(Role::Origin, Role::Edge, &keys).is_ok());
        for peer in [Role::Stager, Role::Publisher, Role::Origin] {
            let refusal = authorize(Role::Origin, peer, &keys).expect_err("not an edge");
            assert_eq!(refusal.code(), ErrorCode::Forbidden, "{peer}");
            assert!(
                refusal.to_string().ends_with("only the edge role may"),
                "{refusal}"
            );
        }
        // A stager never answers nor relays it: keys never pass through a stager.
        let at_stager = authorize(Role::Stager, Role::Edge, &keys).expect_err("stager");
        assert_eq!(
            at_stager.to_string(),
            "ContentKeys is not a request for a stager; send it to an origin"
        );
        assert!(authorize(Role::Edge, Role::Edge, &keys).is_err());
    }
}
