//! The messages of the mesh protocol: what a client asks ([`Request`]) and what a server
//! answers ([`Response`]), with the control-plane and report types they carry. Variants are
//! only ever appended, so earlier ones keep their encodings.

use serde::{Deserialize, Serialize};

use crate::bounds;
use crate::hash::BlobHash;
use crate::manifest::{BundleId, BundleKind, SignedManifest};

/// Most 16 KiB groups one [`Response::BlobPart`] may carry. A server never sends more, and a
/// client refuses a part that claims more: it bounds the memory either side spends on one part
/// (about 512 KiB of data plus its parents), whatever the blob size.
pub const MAX_PART_GROUPS: u64 = 32;

/// Largest blob accepted in one [`Request::PutBlob`], in bytes (a chunk is at most a few MiB).
pub const MAX_PUT_BLOB_BYTES: usize = 8 * 1024 * 1024;

/// A half-open range of 16 KiB group indices, `start..end`.
pub type GroupSpan = (u64, u64);

/// What a client asks on a new bidirectional stream (one request per stream).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// List the bundles the server holds.
    ListBundles,
    /// Resolve `name` (and `version`, or the newest) to a bundle id.
    Resolve {
        /// Bundle name.
        name: String,
        /// Exact version, or `None` for the newest.
        version: Option<String>,
    },
    /// Send the signed manifest of a bundle.
    GetManifest {
        /// The bundle.
        id: BundleId,
    },
    /// Send these groups of a blob as verified streams.
    GetBlob {
        /// The blob.
        hash: BlobHash,
        /// Size of the blob in bytes, from the manifest (lets a cache start a fetch upstream).
        size: u64,
        /// Group ranges wanted, ascending and disjoint.
        groups: Vec<GroupSpan>,
    },
    /// Upload one complete blob (publishers only). The server checks its hash.
    PutBlob {
        /// The blob's hash.
        hash: BlobHash,
        /// The blob's bytes.
        data: Vec<u8>,
    },
    /// Publish a bundle whose blobs were uploaded (publishers only).
    Publish {
        /// The signed manifest.
        manifest: SignedManifest,
    },
    /// Open a subscription: the server sends [`Response::Announce`] for every bundle published
    /// after `after_seq`, then keeps the stream open and sends new ones as they come.
    Subscribe {
        /// Last announcement sequence number the client has seen (0 for none).
        after_seq: u64,
    },
    /// Ask an enrollment server for a certificate (on the enrollment endpoint only).
    Enroll {
        /// The one-time secret from the token.
        secret: [u8; 32],
        /// PEM certificate signing request for the node's key.
        csr_pem: String,
    },
    /// An edge joins its site's peer list on the stager and gets the others' addresses back
    /// (the bootstrap list for peer discovery where multicast is off).
    SitePeers {
        /// Where the edge serves blobs to its peers (QUIC).
        data_addr: String,
        /// The edge's peer-discovery (libp2p) addresses.
        p2p_addrs: Vec<String>,
        /// What the edge holds now (the stager is the site's tracker).
        have: Vec<Holding>,
    },
    /// Ask an edge agent to fetch a bundle (from its own node or the origin).
    Fetch {
        /// A bundle id, `NAME@VERSION` or `NAME`.
        bundle: String,
    },
    /// Ask an edge agent to swap its OS (origin only).
    StartSwap {
        /// The OS to install.
        target: BundleId,
        /// The rescue OS.
        rescue: BundleId,
    },
    /// An edge reports its inventory and what it holds, to its stager or (when none answers)
    /// to the origin. With `negotiate`, it asks what to boot: the answer is
    /// [`Response::BootPlan`]; without, [`Response::Ok`]. The node's id and site are taken from
    /// its certificate, never from the report.
    ReportNode {
        /// What the edge reports.
        report: NodeReport,
        /// Ask for a boot plan too (at every start).
        negotiate: bool,
    },
    /// A stager passes on an edge's [`Request::ReportNode`] to the origin (stagers only). The
    /// stager verified the edge's certificate; the edge's site is the stager's own.
    RelayReport {
        /// The edge's node id, from its certificate.
        #[serde(deserialize_with = "bounds::name")]
        node_id: String,
        /// What the edge reports.
        report: NodeReport,
        /// Ask for a boot plan too.
        negotiate: bool,
    },
    /// An operator's control-plane command to the running origin (origin or publisher
    /// certificates only). Answered by [`Response::Control`].
    Control {
        /// Who runs the command (the operator's login), for the audit log.
        #[serde(deserialize_with = "bounds::name")]
        actor: String,
        /// The command.
        command: ControlCommand,
    },
    /// Run a bundle without persisting it (origin only, to an edge daemon): the edge fetches it
    /// into a temporary area purged at every start and never records it as installed.
    /// Answered by [`Response::TestRunning`] after zero or more [`Response::FetchProgress`].
    TestRun {
        /// The bundle.
        bundle: BundleId,
    },
    /// Ask this edge's own daemon to negotiate now (the node's own certificate only).
    /// Answered by [`Response::Negotiated`].
    Negotiate,
    /// Which bundles the asker's store must keep (retention). Asked of the origin by a stager
    /// (its site's keep-set) or an edge (its own), and of a stager by its site's edges (it asks
    /// the origin with [`Request::RelayKeepSet`]). Answered by [`Response::KeepSet`]; a node
    /// that gets no answer keeps every pin it has.
    KeepSet,
    /// A stager passes on an edge's [`Request::KeepSet`] to the origin (stagers only), with the
    /// edge's node id from its certificate; the edge must belong to the stager's site.
    RelayKeepSet {
        /// The edge's node id, from its certificate.
        #[serde(deserialize_with = "bounds::name")]
        node_id: String,
    },
    /// The content keys this edge may read (edges only, asked of the origin directly, never
    /// through a stager: QUIC's TLS is hop by hop and a stager must never see a key).
    /// Answered by [`Response::ContentKeys`] with the generations the node's class may read
    /// (an empty list when it may read none); a revoked node is refused.
    ContentKeys,
    /// A stager tells the origin what it moved since it started (stagers only), so the
    /// origin's console can show it beside the WAN bytes the origin sent the site. Answered
    /// by [`Response::Ok`]; sent now and then, and only when a figure changed.
    StagerStats {
        /// Payload bytes the stager served to its site's edges.
        served_bytes: u64,
        /// Payload bytes the stager received from upstream (the origin).
        pulled_bytes: u64,
    },
    /// How the last swap to `target` stands (origin only, to an edge daemon): asked after a
    /// [`Request::StartSwap`] whose machine rebooted, until it ends. Answered by
    /// [`Response::Swapped`] once the journal reached an end, [`Response::SwapPending`]
    /// while it runs, or an error when the machine's last swap is not to `target`.
    SwapStatus {
        /// The OS the swap installs.
        target: BundleId,
    },
    /// A stager asks a sibling (another stager of its site) to tell it each chunk the sibling
    /// starts pulling from upstream: answered by a stream of [`Response::FlightStarted`] for as
    /// long as both keep the stream open. The asker copies each such chunk it lacks as it
    /// arrives at the sibling, so the site loses little more than the sibling's bytes in
    /// transit if the sibling dies.
    SiblingFlights,
    /// A stager tells the origin where its site's edges reach it (stagers only), so the origin
    /// can give an enrolling node its site's stagers ([`Response::SiteStagers`]). Answered by
    /// [`Response::Ok`]; sent at start and now and then, so a restarted origin learns it again.
    StagerAddress {
        /// `host:port` of the stager's mesh endpoint, as the site's edges reach it.
        #[serde(deserialize_with = "bounds::name")]
        data_addr: String,
    },
}

/// Content-key generations given to an edge: at most
/// [`crate::keys::MAX_KEY_GENERATIONS`].
fn key_generations<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(crate::keys::KeyGeneration, crate::keys::ContentKey)>, D::Error> {
    crate::bounds::list(d, crate::keys::MAX_KEY_GENERATIONS)
}

/// Most bundles one keep-set names (a site's: the union over its nodes, plus the newest
/// published version of every bundle). An origin whose keep-set would be longer refuses to
/// answer, and the node keeps its pins.
pub const MAX_KEEP_BUNDLES: usize = 4096;

/// The bundles a node or a site must keep: its store pins exactly these (plus what the node
/// needs itself), and may evict any other bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepSet {
    /// The bundles, ascending, without duplicates.
    #[serde(deserialize_with = "keep_bundles")]
    pub bundles: Vec<BundleId>,
}

/// At most [`MAX_KEEP_BUNDLES`] bundle ids.
fn keep_bundles<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<BundleId>, D::Error> {
    crate::bounds::list(d, MAX_KEEP_BUNDLES)
}

/// Why an edge reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportEvent {
    /// Right after enrollment.
    Enrolled,
    /// At the start of `edge-agent serve` (or `edge-agent negotiate`).
    Started,
    /// After the edge fetched what a boot plan asked for.
    Updated,
}

impl ReportEvent {
    /// Lower-case name for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            ReportEvent::Enrolled => "enrolled",
            ReportEvent::Started => "started",
            ReportEvent::Updated => "updated",
        }
    }
}

/// A bundle a node holds, by name, version and id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeBundle {
    /// Bundle name.
    #[serde(deserialize_with = "bounds::name")]
    pub name: String,
    /// Version.
    #[serde(deserialize_with = "bounds::name")]
    pub version: String,
    /// Bundle id.
    pub id: BundleId,
}

impl std::fmt::Display for NodeBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// What an edge reports about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// Why it reports now.
    pub event: ReportEvent,
    /// Its facts and what its operator configured (role, class, site, features).
    pub inventory: crate::inventory::Inventory,
    /// Bundles installed (what it boots with), each complete in its store.
    #[serde(deserialize_with = "bounds::node_bundles")]
    pub installed: Vec<NodeBundle>,
    /// Every bundle whose manifest its store holds (installed or not).
    #[serde(deserialize_with = "bounds::node_bundles")]
    pub held: Vec<NodeBundle>,
    /// Where its daemon serves (QUIC); empty when no daemon runs.
    #[serde(deserialize_with = "bounds::name")]
    pub data_addr: String,
}

/// One bundle a boot plan asks the node to fetch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedBundle {
    /// The bundle.
    pub bundle: NodeBundle,
    /// Its stored (compressed) size, in bytes.
    pub stored_bytes: u64,
    /// Why the node needs it (the rule, feature or dependency).
    #[serde(deserialize_with = "bounds::message")]
    pub reason: String,
}

/// The origin's answer at boot (brief 002): what the node should run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootPlan {
    /// The node holds exactly the desired versions: boot as it is.
    BootAsYouAre {
        /// The desired (and installed) bundles.
        #[serde(deserialize_with = "bounds::node_bundles")]
        bundles: Vec<NodeBundle>,
    },
    /// The node must fetch `fetch` (and stop booting `drop`) before it boots.
    Fetch {
        /// Bundles that differ from what it holds.
        #[serde(deserialize_with = "bounds::planned_bundles")]
        fetch: Vec<PlannedBundle>,
        /// Installed bundles that stay.
        #[serde(deserialize_with = "bounds::node_bundles")]
        keep: Vec<NodeBundle>,
        /// Installed bundles no longer desired.
        #[serde(deserialize_with = "bounds::node_bundles")]
        drop: Vec<NodeBundle>,
    },
    /// No rule matches the node and it asks for no feature (brief 004).
    NoImage {
        /// The facts tried, in precedence order, as `level=value`.
        #[serde(deserialize_with = "bounds::facts")]
        facts: Vec<String>,
    },
    /// The policy cannot decide for this node (a conflict, say); the message names the rules.
    PolicyError {
        /// Why.
        #[serde(deserialize_with = "bounds::message")]
        message: String,
    },
    /// No rule matches, but the node's class may capture (brief 004): run the configured install
    /// script into the spare slot, and publish the result (with publisher rights) as `name`.
    /// Appended: the earlier variants keep their indices.
    NoImageCapture {
        /// The facts tried, in precedence order, as `level=value`.
        #[serde(deserialize_with = "bounds::facts")]
        facts: Vec<String>,
        /// The bundle name to publish the captured image under.
        #[serde(deserialize_with = "bounds::name")]
        name: String,
    },
}

/// What an edge's negotiation did: the origin's plan and what was fetched for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NegotiationOutcome {
    /// The origin's answer.
    pub plan: BootPlan,
    /// Bundles fetched for it.
    #[serde(deserialize_with = "bounds::fetch_summaries")]
    pub fetched: Vec<FetchSummary>,
}

/// A control-plane command (see `origin --help`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlCommand {
    /// The node table.
    Nodes,
    /// Replace the policy (rules, precedence, features) with this TOML document.
    PolicyLoad {
        /// Where it came from (a file name), for the audit log.
        #[serde(deserialize_with = "bounds::name")]
        source: String,
        /// The TOML text.
        #[serde(deserialize_with = "bounds::document")]
        toml: String,
    },
    /// Every node's resolution and every conflict.
    PolicyCheck,
    /// Put a node in a class (overrides the class it reports).
    ClassSet {
        /// Node id (or a unique prefix).
        #[serde(deserialize_with = "bounds::name")]
        node: String,
        /// The class.
        #[serde(deserialize_with = "bounds::name")]
        class: String,
    },
    /// Pin a bundle version on one node.
    OverrideSet {
        /// Node id (or a unique prefix).
        #[serde(deserialize_with = "bounds::name")]
        node: String,
        /// `NAME@VERSION`.
        #[serde(deserialize_with = "bounds::name")]
        bundle: String,
    },
    /// Remove a node's overrides (of one bundle name, or all).
    OverrideClear {
        /// Node id (or a unique prefix).
        #[serde(deserialize_with = "bounds::name")]
        node: String,
        /// Only this bundle name.
        #[serde(deserialize_with = "bounds::optional_name")]
        name: Option<String>,
    },
    /// The newest audit records.
    Audit {
        /// How many.
        limit: u32,
    },
    /// Tell a node to run a bundle without persisting it.
    TestRun {
        /// Node id (or a unique prefix).
        #[serde(deserialize_with = "bounds::name")]
        node: String,
        /// A bundle id, `NAME@VERSION` or `NAME`.
        #[serde(deserialize_with = "bounds::name")]
        bundle: String,
    },
    /// Start a canary rollout of an OS bundle to the nodes a selector picks (one at a time).
    RolloutStart {
        /// The OS to install: `NAME@VERSION` or a bundle id.
        #[serde(deserialize_with = "bounds::name")]
        bundle: String,
        /// The rescue OS each swap keeps: `NAME@VERSION` or a bundle id.
        #[serde(deserialize_with = "bounds::name")]
        rescue: String,
        /// `all`, or `KEY=VALUE[,KEY=VALUE...]` with keys site, class, role, node (all must match).
        #[serde(deserialize_with = "bounds::name")]
        selector: String,
        /// Failures tolerated outside canary waves before the rollout halts.
        max_failures: u32,
        /// Offer the bundle to nodes running a newer version too.
        downgrade: bool,
    },
    /// Ask about, pause, resume or abort the rollout.
    Rollout {
        /// What to do.
        action: RolloutAction,
    },
    /// Start a new content-key generation: new encrypted publishes use it (issue 16).
    KeysRotate,
    /// The content-key generations, with fingerprints (never keys).
    KeysList,
    /// Remove a content-key generation (never the current one; not while a node that was not
    /// revoked runs or should run a bundle sealed with it, unless `force`).
    KeysRetire {
        /// The generation.
        generation: u32,
        /// Retire it even though nodes still need it.
        force: bool,
    },
    /// Revoke a node: the origin refuses its requests and its content keys from now on, and
    /// starts a new key generation it never gets.
    NodeRevoke {
        /// Node id (or a unique prefix).
        #[serde(deserialize_with = "bounds::name")]
        node: String,
    },
    /// Make the nodes a selector picks fetch a bundle through their site, verify it and keep
    /// it, without swapping (issue 17); nodes offline now prepare when they report again.
    /// Answered at once with the operation (its id and every node pending).
    Prepare {
        /// The bundle: `NAME@VERSION`, `NAME` (the newest) or a bundle id.
        #[serde(deserialize_with = "bounds::name")]
        bundle: String,
        /// `all`, or `KEY=VALUE[,KEY=VALUE...]` with keys site, class, role, node (as a rollout's).
        #[serde(deserialize_with = "bounds::name")]
        selector: String,
    },
    /// Where a prepare operation stands (`None`: the newest), node by node and site by site.
    PrepareStatus {
        /// The operation's id.
        id: Option<u64>,
    },
    /// Cancel a prepare operation: its nodes are not asked any more and keep nothing for it.
    PrepareCancel {
        /// The operation's id.
        id: u64,
    },
    /// Add or replace a web console account (issue 17); only the origin's own certificate
    /// may. The password never leaves the command: it sends the Argon2id hash.
    AccountAdd {
        /// The login name.
        #[serde(deserialize_with = "bounds::name")]
        name: String,
        /// `admin` or `viewer`.
        #[serde(deserialize_with = "bounds::name")]
        role: String,
        /// The Argon2id hash of the password, as a PHC string.
        #[serde(deserialize_with = "bounds::name")]
        password_hash: String,
    },
    /// The web console accounts: names, roles, when each was last set (never the hashes).
    AccountList,
    /// Remove a web console account; its sessions end at their next request. Only the
    /// origin's own certificate may.
    AccountRemove {
        /// The login name.
        #[serde(deserialize_with = "bounds::name")]
        name: String,
    },
    /// The origin's store (backend, health of its members) and the origins sharing it.
    Status,
    /// Which of the origins up hold a bundle (`origin publish --replicas`).
    BundleHolders {
        /// The bundle.
        id: crate::manifest::BundleId,
    },
    /// A one-time token that enrolls one node of `role` in `site` at any origin sharing the
    /// store (`origin enroll`); the reply's text is the token. Only the origin's own
    /// certificate may.
    EnrollToken {
        /// `stager` or `edge`.
        #[serde(deserialize_with = "bounds::name")]
        role: String,
        /// The node's site.
        #[serde(deserialize_with = "bounds::name")]
        site: String,
    },
}

/// An operator's request about the current rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutAction {
    /// Where it stands (also after it ended).
    Status,
    /// Start no new wave until resumed.
    Pause,
    /// Continue a paused rollout.
    Resume,
    /// Halt for good; swaps already started finish.
    Abort,
}

/// The origin's answer to a [`Request::Control`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    /// False when the command failed or found a problem (conflicts): the CLI exits non-zero.
    pub success: bool,
    /// For people (a table, or what went wrong).
    #[serde(deserialize_with = "bounds::document")]
    pub text: String,
    /// For machines (JSON; `null` when there is nothing structured).
    #[serde(deserialize_with = "bounds::document")]
    pub json: String,
}

/// What a [`Request::TestRun`] did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestRunSummary {
    /// The fetch.
    pub fetch: FetchSummary,
    /// Where the bundle runs from (a temporary directory purged at the next start).
    #[serde(deserialize_with = "bounds::name")]
    pub root: String,
}

/// An edge of the site, as the stager knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitePeer {
    /// The edge's node id (hex).
    pub node_id: String,
    /// Where it serves blobs (QUIC).
    pub data_addr: String,
    /// Its peer-discovery (libp2p) addresses.
    pub p2p_addrs: Vec<String>,
    /// What it held when it last reported.
    pub have: Vec<Holding>,
}

/// What a node holds of one bundle: ranges `[start, end)` of the bundle's pieces (its distinct
/// chunks in manifest order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// Bundle id (hex).
    pub bundle: String,
    /// Held piece ranges, ascending and disjoint.
    pub pieces: Vec<(u32, u32)>,
}

/// Most bundles one node reports holding at once (newest first).
pub const MAX_HOLDINGS: usize = 16;

/// Most piece ranges one holding may list.
pub const MAX_HOLDING_RANGES: usize = 4096;

/// What a finished fetch moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchSummary {
    /// The bundle.
    pub id: BundleId,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// Bytes received from all sources.
    pub bytes_received: u64,
    /// Of those, bytes received from peers of the site.
    pub bytes_from_peers: u64,
    /// Chunks that were already held.
    pub chunks_present: u64,
    /// Chunks in the bundle.
    pub chunks: u64,
}

/// A bundle as listed by a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleInfo {
    /// Bundle id.
    pub id: BundleId,
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Kind.
    pub kind: BundleKind,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Stored (compressed) bytes of all chunks.
    pub stored_bytes: u64,
    /// Payload bytes once unpacked.
    pub raw_bytes: u64,
    /// Announcement sequence number.
    pub seq: u64,
}

/// Machine-readable reason of a [`Response::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The thing asked for does not exist here.
    NotFound,
    /// The peer's certificate does not allow this request.
    Forbidden,
    /// The request was malformed or inconsistent.
    BadRequest,
    /// The server failed; retrying elsewhere may work.
    Internal,
    /// The server is overloaded; retry later.
    Busy,
}

/// What a server answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::ListBundles`].
    Bundles(Vec<BundleInfo>),
    /// Answer to [`Request::Resolve`].
    Resolved(BundleInfo),
    /// Answer to [`Request::GetManifest`].
    Manifest(SignedManifest),
    /// Header of one part of a blob answer: the bao encoding of exactly `groups` follows,
    /// raw, right after this frame. A blob answer is one or more parts, then [`Response::BlobEnd`].
    BlobPart {
        /// Group ranges encoded in this part, ascending and disjoint.
        groups: Vec<GroupSpan>,
    },
    /// End of a blob answer.
    BlobEnd,
    /// Answer to `PutBlob` and `Publish`.
    Ok,
    /// A newly published bundle (on a subscription stream).
    Announce(BundleInfo),
    /// Answer to [`Request::Enroll`].
    Enrolled {
        /// The node's certificate, PEM.
        cert_pem: String,
        /// The mesh CA certificate, PEM.
        ca_pem: String,
        /// The publisher's ed25519 public key, to check manifests with.
        publisher_key: [u8; 32],
        /// Where the origin's mesh endpoint listens.
        origin_addr: String,
    },
    /// Answer to [`Request::SitePeers`]: the other edges of the site.
    SitePeers(Vec<SitePeer>),
    /// Progress of a [`Request::Fetch`]; zero or more precede [`Response::Fetched`].
    FetchProgress {
        /// Bytes of the bundle now held.
        done_bytes: u64,
        /// Bytes of the bundle in all.
        total_bytes: u64,
    },
    /// A [`Request::Fetch`] finished: the bundle is held and pinned.
    Fetched(FetchSummary),
    /// A [`Request::StartSwap`] ended.
    Swapped {
        /// The swap's final step (`done`, `rolled-back`, `aborted`).
        outcome: String,
        /// Why, when it did not end on the new OS.
        failure: Option<String>,
    },
    /// The request failed.
    Error {
        /// Why, for machines.
        code: ErrorCode,
        /// Why, for people.
        message: String,
    },
    /// Answer to a [`Request::ReportNode`] or [`Request::RelayReport`] that negotiates.
    BootPlan(BootPlan),
    /// Answer to [`Request::Control`].
    Control(ControlReply),
    /// Answer to [`Request::TestRun`]: the bundle is fetched and runs from a temporary area.
    TestRunning(TestRunSummary),
    /// Answer to [`Request::Negotiate`].
    Negotiated(NegotiationOutcome),
    /// Answer to [`Request::KeepSet`] and [`Request::RelayKeepSet`].
    KeepSet(KeepSet),
    /// Answer to [`Request::ContentKeys`]: every generation the node may read, oldest first.
    /// `Debug` shows fingerprints only.
    ContentKeys {
        /// The generations and their keys.
        #[serde(deserialize_with = "key_generations")]
        generations: Vec<(crate::keys::KeyGeneration, crate::keys::ContentKey)>,
    },
    /// A swap is under way and has not ended: sent by a real machine before it reboots during
    /// a [`Request::StartSwap`] (the stream then ends with the machine's reboot), and as the
    /// answer to [`Request::SwapStatus`] while the journal has not reached an end.
    SwapPending {
        /// The journal's current step (`reboot-to-rescue`, `health-check`, ...).
        #[serde(deserialize_with = "bounds::name")]
        step: String,
    },
    /// On a [`Request::SiblingFlights`] stream: the sibling started pulling chunk `hash` from
    /// upstream. Only a hint: the asker copies it only if a manifest it verified names it.
    FlightStarted {
        /// The chunk.
        hash: BlobHash,
    },
    /// After [`Response::Enrolled`], on the same stream: the site's stagers the origin knows
    /// to be up (`host:port` each), for the node to fetch from besides any it is configured
    /// with. A node that reads only the first frame (an older one) ignores it; an older
    /// origin sends none.
    SiteStagers(#[serde(deserialize_with = "bounds::site_stagers")] Vec<String>),
    /// After [`Response::SiteStagers`], on the same stream: the mesh addresses of every
    /// origin up (issue 14), for the node to turn to when the one it enrolled with is gone.
    /// A node that does not read it ignores it; an older origin sends none.
    Origins(#[serde(deserialize_with = "bounds::site_stagers")] Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounds::{MAX_NAME_BYTES, MAX_NODE_BUNDLES};
    use crate::wire::frame::{decode_frame, encode_frame, LENGTH_PREFIX_BYTES, VERSION_BYTES};

    fn sample_report() -> NodeReport {
        let id = BlobHash::of(b"os");
        NodeReport {
            event: ReportEvent::Started,
            inventory: crate::inventory::Inventory {
                cpu_model: Some("Xeon".into()),
                cpu_count: Some(8),
                role: Some("web".into()),
                features: vec!["monitoring".into()],
                nics: vec![crate::inventory::Nic {
                    name: "eth0".into(),
                    mac: "52:54:00:12:34:56".into(),
                }],
                ..Default::default()
            },
            installed: vec![NodeBundle {
                name: "os".into(),
                version: "1".into(),
                id,
            }],
            held: Vec::new(),
            data_addr: "127.0.0.1:7420".into(),
        }
    }

    #[test]
    fn control_plane_messages_round_trip() {
        let bundle = NodeBundle {
            name: "app".into(),
            version: "2".into(),
            id: BlobHash::of(b"app"),
        };
        let requests = vec![
            Request::ReportNode {
                report: sample_report(),
                negotiate: true,
            },
            Request::RelayReport {
                node_id: "abc".into(),
                report: sample_report(),
                negotiate: false,
            },
            Request::Control {
                actor: "alice".into(),
                command: ControlCommand::PolicyLoad {
                    source: "policy.toml".into(),
                    toml: "[[rules]]".into(),
                },
            },
            Request::Control {
                actor: "alice".into(),
                command: ControlCommand::OverrideClear {
                    node: "n".into(),
                    name: Some("os".into()),
                },
            },
            Request::TestRun {
                bundle: BlobHash::of(b"t"),
            },
            Request::Control {
                actor: "alice".into(),
                command: ControlCommand::Prepare {
                    bundle: "os@2".into(),
                    selector: "site=a".into(),
                },
            },
            Request::Control {
                actor: "alice".into(),
                command: ControlCommand::PrepareStatus { id: Some(3) },
            },
            Request::Negotiate,
            Request::KeepSet,
            Request::RelayKeepSet {
                node_id: "abc".into(),
            },
        ];
        for request in requests {
            let frame = encode_frame(&request).expect("encode");
            let (back, _): (Request, usize) = decode_frame(&frame).expect("decode").expect("whole");
            assert_eq!(back, request);
        }
        let responses = vec![
            Response::BootPlan(BootPlan::Fetch {
                fetch: vec![PlannedBundle {
                    bundle: bundle.clone(),
                    stored_bytes: 10,
                    reason: "rule web".into(),
                }],
                keep: vec![bundle.clone()],
                drop: Vec::new(),
            }),
            Response::BootPlan(BootPlan::NoImage {
                facts: vec!["role=-".into()],
            }),
            Response::BootPlan(BootPlan::NoImageCapture {
                facts: vec!["model=LabBox".into(), "class=lab".into()],
                name: "captured-os".into(),
            }),
            Response::Control(ControlReply {
                success: false,
                text: "table".into(),
                json: "null".into(),
            }),
            Response::Negotiated(NegotiationOutcome {
                plan: BootPlan::BootAsYouAre {
                    bundles: vec![bundle],
                },
                fetched: Vec::new(),
            }),
            Response::KeepSet(KeepSet {
                bundles: vec![BlobHash::of(b"a"), BlobHash::of(b"b")],
            }),
        ];
        for response in responses {
            let frame = encode_frame(&response).expect("encode");
            let (back, _): (Response, usize) =
                decode_frame(&frame).expect("decode").expect("whole");
            assert_eq!(back, response);
        }
    }

    #[test]
    fn new_variants_leave_old_encodings_alone() {
        // The first byte of a payload is the variant index: appending variants keeps them.
        let old = [
            (Request::ListBundles, 0u8),
            (
                Request::StartSwap {
                    target: BlobHash::of(b"a"),
                    rescue: BlobHash::of(b"b"),
                },
                10,
            ),
        ];
        for (request, index) in old {
            let frame = encode_frame(&request).expect("encode");
            assert_eq!(frame[LENGTH_PREFIX_BYTES + VERSION_BYTES], index);
        }
        let frame = encode_frame(&Response::Error {
            code: ErrorCode::Busy,
            message: String::new(),
        })
        .expect("encode");
        assert_eq!(frame[LENGTH_PREFIX_BYTES + VERSION_BYTES], 12);
    }

    #[test]
    fn an_oversized_keep_set_is_refused() {
        let ids: Vec<BundleId> = (0..=MAX_KEEP_BUNDLES as u32)
            .map(|i| BlobHash::of(&i.to_le_bytes()))
            .collect();
        let frame = encode_frame(&Response::KeepSet(KeepSet { bundles: ids })).expect("encode");
        assert!(decode_frame::<Response>(&frame).is_err());
    }

    #[test]
    fn content_keys_round_trip_bounded_and_never_shown() {
        use crate::keys::{ContentKey, KeyGeneration, MAX_KEY_GENERATIONS};
        let key = ContentKey::from_bytes([0x5A; 32]);
        let answer = Response::ContentKeys {
            generations: vec![(KeyGeneration(1), key.clone())],
        };
        let frame = encode_frame(&answer).expect("encode");
        let (decoded, _) = decode_frame::<Response>(&frame)
            .expect("decode")
            .expect("whole");
        assert_eq!(decoded, answer);
        assert!(!format!("{answer:?}").to_lowercase().contains("5a5a"));
        let many = Response::ContentKeys {
            generations: (0..=MAX_KEY_GENERATIONS as u32)
                .map(|g| (KeyGeneration(g), key.clone()))
                .collect(),
        };
        let frame = encode_frame(&many).expect("encode");
        let err = decode_frame::<Response>(&frame).expect_err("too many generations");
        assert!(err.to_string().contains("exceeds its bound"), "{err}");
        // Truncated answers are refused, never a panic.
        let frame = encode_frame(&answer).expect("encode");
        for cut in 0..frame.len() {
            let _ = decode_frame::<Response>(&frame[..cut]);
        }
    }

    #[test]
    fn oversized_report_fields_are_refused() {
        let mut long_name = sample_report();
        long_name.data_addr = "x".repeat(MAX_NAME_BYTES + 1);
        let mut many = sample_report();
        many.installed = vec![many.installed[0].clone(); MAX_NODE_BUNDLES + 1];
        let mut many_features = sample_report();
        many_features.inventory.features =
            vec!["f".into(); crate::inventory::MAX_INVENTORY_ITEMS + 1];
        let mut long_fact = sample_report();
        long_fact.inventory.model = Some("m".repeat(MAX_NAME_BYTES + 1));
        for report in [long_name, many, many_features, long_fact] {
            let frame = encode_frame(&Request::ReportNode {
                report,
                negotiate: true,
            })
            .expect("encode");
            let err = decode_frame::<Request>(&frame).expect_err("oversized");
            assert!(err.to_string().contains("exceeds its bound"), "{err}");
        }
    }

    #[test]
    fn capture_plans_keep_earlier_variants_and_are_bounded() {
        // NoImage keeps its index (2); the capture answer is appended after PolicyError (3).
        let no_image =
            crate::codec::encode(&BootPlan::NoImage { facts: Vec::new() }).expect("encode");
        assert_eq!(no_image[0], 2);
        let capture = BootPlan::NoImageCapture {
            facts: vec!["model=m".into()],
            name: "captured-os".into(),
        };
        let bytes = crate::codec::encode(&capture).expect("encode");
        assert_eq!(bytes[0], 4);
        let long = encode_frame(&Response::BootPlan(BootPlan::NoImageCapture {
            facts: Vec::new(),
            name: "n".repeat(MAX_NAME_BYTES + 1),
        }))
        .expect("encode");
        let err = decode_frame::<Response>(&long).expect_err("oversized");
        assert!(err.to_string().contains("exceeds its bound"), "{err}");
    }
}
