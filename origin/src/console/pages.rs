//! The console's read-only pages beyond the overview (issue 17): sites, nodes (a bounded,
//! paged search and one node's detail), bundles, prepare operations and the audit log. Each
//! is an HTML page and a JSON twin under `/api/...` built from the same view, so the two
//! never disagree. Every view is read from the origin's database and catalog, the state the
//! CLI commands read; none changes anything, so viewers see all of them.
//!
//! Bad query parameters (unknown names, a page beyond the bound, an over-long search) get
//! 400, unknown ids 404; without a session a page redirects to `/login` and a JSON twin
//! answers 401.

// CommandError carries the policy's own errors whole; built once per request.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::page::{self, escape};
use super::session::Session;
use super::{see_other, ApiError, Console, Format};
use crate::db::{AccountRole, NodeRecord};

/// Nodes on one page of `/nodes` unless `per_page` says otherwise.
pub const NODES_PER_PAGE: usize = 50;

/// Most nodes one page of `/nodes` may ask for (`per_page`).
pub const MAX_NODES_PER_PAGE: usize = 500;

/// Audit records on one page of `/audit`.
pub const AUDIT_PER_PAGE: usize = 100;

/// Prepare operations `/prepares` lists, newest first.
pub const PREPARES_LISTED: usize = 200;

/// Longest search text or filter value accepted, in bytes.
pub const MAX_QUERY_VALUE_BYTES: usize = 128;

/// Highest page number accepted by paged views.
pub const MAX_PAGE: usize = 10_000;

/// Edges listed per site on `/sites` (all are counted; `/nodes?site=` pages through them).
pub const EDGES_LISTED_PER_SITE: usize = 20;

/// Longest node id accepted in a path, in bytes.
const MAX_ID_BYTES: usize = 256;

/// The pages' routes, merged into [`super::router`].
pub fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/sites", get(sites))
        .route("/api/sites", get(sites))
        .route("/nodes", get(nodes))
        .route("/api/nodes", get(nodes))
        .route("/nodes/{id}", get(node))
        .route("/api/nodes/{id}", get(node))
        .route("/bundles", get(bundles))
        .route("/api/bundles", get(bundles))
        .route("/prepares", get(prepares))
        .route("/api/prepares", get(prepares))
        .route("/prepares/{id}", get(prepare))
        .route("/api/prepares/{id}", get(prepare))
        .route("/audit", get(audit))
        .route("/api/audit", get(audit))
}

/// What a page request is refused for, beyond the console's own refusals.
enum PageError {
    /// A query parameter or path segment that does not parse or is out of bounds.
    BadRequest(String),
    /// A console refusal (no session, not found, internal).
    Api(ApiError),
}

impl From<ApiError> for PageError {
    fn from(error: ApiError) -> Self {
        PageError::Api(error)
    }
}

impl From<crate::db::DbError> for PageError {
    fn from(error: crate::db::DbError) -> Self {
        PageError::Api(ApiError::Internal(error.to_string()))
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::BadRequest(what) => (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": what })),
            )
                .into_response(),
            PageError::Api(error) => error.into_response(),
        }
    }
}

/// The session's account, for the navigation bar.
struct Viewer {
    account: String,
    role: AccountRole,
    csrf: String,
}

impl From<Session> for Viewer {
    fn from(session: Session) -> Self {
        Viewer {
            account: session.account,
            role: session.role,
            csrf: session.csrf,
        }
    }
}

/// Answers a page (`html`) or its JSON twin: authenticates, gathers the view in a blocking
/// section (every view is a database or catalog read) and renders it.
fn answer<V: Serialize>(
    console: &Console,
    headers: &HeaderMap,
    html: bool,
    gather: impl FnOnce(&Console) -> Result<V, PageError>,
    render: impl FnOnce(&V, &Viewer) -> String,
) -> Response {
    let session = match console.authenticate(headers) {
        Ok((_, session)) => session,
        Err(ApiError::Unauthenticated) if html => return see_other("/login"),
        Err(error) => return error.into_response(),
    };
    match tokio::task::block_in_place(|| gather(console)) {
        Ok(view) if html => Html(render(&view, &Viewer::from(session))).into_response(),
        Ok(view) => Json(view).into_response(),
        Err(error) => error.into_response(),
    }
}

/// Parses a query string into `T`, refusing unknown names and over-long values with 400.
fn parse_query<T: for<'de> Deserialize<'de> + Default>(
    raw: Option<String>,
) -> Result<T, PageError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(T::default());
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(&raw)
        .map_err(|e| PageError::BadRequest(format!("the query does not parse: {e}")))?;
    if let Some((name, _)) = pairs
        .iter()
        .find(|(_, value)| value.len() > MAX_QUERY_VALUE_BYTES)
    {
        return Err(PageError::BadRequest(format!(
            "query parameter `{}` is longer than {MAX_QUERY_VALUE_BYTES} bytes",
            truncate(name)
        )));
    }
    serde_urlencoded::from_str(&raw)
        .map_err(|e| PageError::BadRequest(format!("bad query parameters: {e}")))
}

/// A page number from 1 to [`MAX_PAGE`].
fn check_page(page: Option<usize>) -> Result<usize, PageError> {
    match page.unwrap_or(1) {
        0 => Err(PageError::BadRequest("pages count from 1".into())),
        p if p > MAX_PAGE => Err(PageError::BadRequest(format!(
            "page {p} is beyond the last page accepted, {MAX_PAGE}"
        ))),
        p => Ok(p),
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(32).collect()
}

// ---- sites ----

/// `GET /api/sites`: every site's stagers (as this origin saw them connect) and edges (as
/// their reports tell it).
#[derive(Debug, Serialize)]
pub struct SitesView {
    /// What the origin knows and does not know about the sites' traffic.
    pub note: &'static str,
    /// Every site that has a node, by name.
    pub sites: Vec<SiteDetail>,
}

/// One site.
#[derive(Debug, Serialize)]
pub struct SiteDetail {
    /// Its name.
    pub site: String,
    /// Its stagers seen since this origin started.
    pub stagers: Vec<crate::stagers::StagerSeen>,
    /// Bytes this origin sent to the site's stagers since it started (the site's WAN pull).
    pub wan_bytes_from_origin: u64,
    /// Its edges, the first [`EDGES_LISTED_PER_SITE`] by id.
    pub edges: Vec<NodeLine>,
    /// Every edge of the site.
    pub edge_count: usize,
    /// Edges per installed version (`name version`), for the at-a-glance column.
    pub edge_versions: BTreeMap<String, usize>,
}

/// One node in a listing.
#[derive(Debug, Serialize)]
pub struct NodeLine {
    /// Node id.
    pub id: String,
    /// Site.
    pub site: String,
    /// Configured role.
    pub role: Option<String>,
    /// Configured class.
    pub class: Option<String>,
    /// Bundles it reported installed, as `name version`.
    pub installed: Vec<String>,
    /// Bundles its store holds (reported), as `name version`.
    pub held: Vec<String>,
    /// Where it stands with its desired bundles.
    pub state: String,
    /// When it last reported (ms since the Unix epoch).
    pub last_seen_ms: u64,
}

/// What the sites page says about traffic counters.
const SITES_NOTE: &str = "Edges are listed as they last reported to the origin's database: \
     role, class, installed and held bundles. Stagers are listed as this origin saw them \
     connect since it started (up: connected now, or seen in the last 2 minutes), with the \
     bytes this origin sent the site's stagers (what the site pulled across its WAN link from \
     this origin) and each stager's own figures since it started, which it reports every few \
     seconds: bytes pulled from upstream and bytes served to its edges.";

impl NodeLine {
    fn of(node: &NodeRecord) -> Self {
        NodeLine {
            id: node.id.clone(),
            site: node.site.clone(),
            role: node.inventory.role.clone(),
            class: node.inventory.class.clone(),
            installed: node
                .installed
                .iter()
                .map(|b| format!("{} {}", b.name, b.version))
                .collect(),
            held: node
                .held
                .iter()
                .map(|b| format!("{} {}", b.name, b.version))
                .collect(),
            state: node.state.name().to_owned(),
            last_seen_ms: node.last_seen_ms,
        }
    }
}

fn gather_sites(console: &Console) -> Result<SitesView, PageError> {
    let nodes = console.origin.control().db().nodes()?;
    let mut sites: BTreeMap<String, SiteDetail> = BTreeMap::new();
    let entry = |sites: &mut BTreeMap<String, SiteDetail>, name: &str| {
        if !sites.contains_key(name) {
            sites.insert(
                name.to_owned(),
                SiteDetail {
                    site: name.to_owned(),
                    stagers: Vec::new(),
                    wan_bytes_from_origin: console.origin.bytes_sent_to_stagers(name),
                    edges: Vec::new(),
                    edge_count: 0,
                    edge_versions: BTreeMap::new(),
                },
            );
        }
    };
    for stager in console.origin.stagers() {
        entry(&mut sites, &stager.site);
        if let Some(site) = sites.get_mut(&stager.site) {
            site.stagers.push(stager);
        }
    }
    for node in &nodes {
        entry(&mut sites, &node.site);
        let Some(site) = sites.get_mut(&node.site) else {
            continue;
        };
        let line = NodeLine::of(node);
        for version in &line.installed {
            *site.edge_versions.entry(version.clone()).or_default() += 1;
        }
        site.edge_count += 1;
        if site.edges.len() < EDGES_LISTED_PER_SITE {
            site.edges.push(line);
        }
    }
    Ok(SitesView {
        note: SITES_NOTE,
        sites: sites.into_values().collect(),
    })
}

fn render_sites(view: &SitesView, viewer: &Viewer) -> String {
    let mut body = format!("<h1>Sites</h1><p class=\"note\">{}</p>", escape(view.note));
    if view.sites.is_empty() {
        body.push_str("<p>No node has reported yet.</p>");
    }
    for site in &view.sites {
        let _ = write!(
            body,
            "<h2 id=\"site-{0}\">{0}</h2><p><a href=\"/nodes?site={1}\">{2} edges</a>; edges by version: {3}</p>",
            escape(&site.site),
            escape(&urlencode(&site.site)),
            site.edge_count,
            if site.edge_versions.is_empty() {
                "none reported".to_owned()
            } else {
                site.edge_versions
                    .iter()
                    .map(|(v, n)| format!("{} × {n}", escape(v)))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        let _ = write!(
            body,
            "<h3>Stagers</h3><p>This origin sent the site's stagers <span class=\"wan-bytes\">{}</span> bytes since it started.</p>",
            site.wan_bytes_from_origin
        );
        stager_table(&mut body, &site.stagers);
        body.push_str("<h3>Edges</h3>");
        node_table(&mut body, &site.edges);
        if site.edge_count > site.edges.len() {
            let _ = write!(
                body,
                "<p>The first {} of {} edges; <a href=\"/nodes?site={}\">all of them</a>.</p>",
                site.edges.len(),
                site.edge_count,
                escape(&urlencode(&site.site)),
            );
        }
    }
    page::layout(
        "Sites",
        "/sites",
        viewer.account.as_str(),
        viewer.role,
        &viewer.csrf,
        &body,
    )
}

fn stager_table(body: &mut String, stagers: &[crate::stagers::StagerSeen]) {
    if stagers.is_empty() {
        body.push_str("<p>None seen since this origin started.</p>");
        return;
    }
    body.push_str(
        "<table><tr><th>Stager</th><th>State</th><th>Announcement streams</th><th>Pulled from upstream</th><th>Served to edges</th><th>First seen</th><th>Last request</th></tr>",
    );
    for stager in stagers {
        let _ = write!(
            body,
            "<tr class=\"stager\"><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td class=\"num pulled\">{}</td><td class=\"num served\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&stager.id),
            if stager.up { "up" } else { "gone" },
            stager.subscriptions,
            stager
                .stats
                .map_or_else(|| "not reported".to_owned(), |s| s.pulled_bytes.to_string()),
            stager
                .stats
                .map_or_else(|| "not reported".to_owned(), |s| s.served_bytes.to_string()),
            escape(&format_ms(stager.first_seen_ms)),
            escape(&format_ms(stager.last_seen_ms)),
        );
    }
    body.push_str("</table>");
}

fn node_table(body: &mut String, nodes: &[NodeLine]) {
    if nodes.is_empty() {
        body.push_str("<p>None.</p>");
        return;
    }
    body.push_str(
        "<table><tr><th>Node</th><th>Site</th><th>Role</th><th>Class</th><th>Installed</th><th>State</th><th>Last report</th></tr>",
    );
    for node in nodes {
        let _ = write!(
            body,
            "<tr><td><a href=\"/nodes/{}\">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&urlencode(&node.id)),
            escape(&node.id),
            escape(&node.site),
            escape(node.role.as_deref().unwrap_or("")),
            escape(node.class.as_deref().unwrap_or("")),
            escape(&node.installed.join(", ")),
            escape(&node.state),
            escape(&format_ms(node.last_seen_ms)),
        );
    }
    body.push_str("</table>");
}

async fn sites(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    headers: HeaderMap,
) -> Response {
    answer(&console, &headers, html, gather_sites, render_sites)
}

// ---- nodes ----

/// The query of `/nodes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodesQuery {
    /// Text found in a node's id, site, class, role or an installed version.
    #[serde(default)]
    pub q: Option<String>,
    /// Only this site.
    #[serde(default)]
    pub site: Option<String>,
    /// Only this class.
    #[serde(default)]
    pub class: Option<String>,
    /// Only nodes with an installed bundle of this version (or `name version`).
    #[serde(default)]
    pub version: Option<String>,
    /// Page, from 1.
    #[serde(default)]
    pub page: Option<usize>,
    /// Nodes per page, at most [`MAX_NODES_PER_PAGE`].
    #[serde(default)]
    pub per_page: Option<usize>,
}

/// `GET /api/nodes`: one page of the nodes that match, by id.
#[derive(Debug, Serialize)]
pub struct NodesView {
    /// The search text.
    pub q: String,
    /// The filters.
    pub site: String,
    /// Class filter.
    pub class: String,
    /// Version filter.
    pub version: String,
    /// This page, from 1.
    pub page: usize,
    /// Nodes per page.
    pub per_page: usize,
    /// Nodes that match, on every page.
    pub matching: usize,
    /// Nodes in the database.
    pub total: usize,
    /// This page's nodes.
    pub nodes: Vec<NodeLine>,
}

fn matches(node: &NodeRecord, query: &NodesQuery) -> bool {
    let nonempty = |v: &Option<String>| v.as_deref().filter(|v| !v.is_empty()).map(str::to_owned);
    if let Some(site) = nonempty(&query.site) {
        if node.site != site {
            return false;
        }
    }
    if let Some(class) = nonempty(&query.class) {
        if node.inventory.class.as_deref() != Some(class.as_str()) {
            return false;
        }
    }
    if let Some(version) = nonempty(&query.version) {
        if !node
            .installed
            .iter()
            .any(|b| b.version == version || format!("{} {}", b.name, b.version) == version)
        {
            return false;
        }
    }
    if let Some(q) = nonempty(&query.q) {
        let q = q.to_lowercase();
        let found = node.id.to_lowercase().contains(&q)
            || node.site.to_lowercase().contains(&q)
            || node
                .inventory
                .class
                .as_deref()
                .is_some_and(|c| c.to_lowercase().contains(&q))
            || node
                .inventory
                .role
                .as_deref()
                .is_some_and(|r| r.to_lowercase().contains(&q))
            || node
                .installed
                .iter()
                .any(|b| b.version.to_lowercase().contains(&q));
        if !found {
            return false;
        }
    }
    true
}

fn gather_nodes(console: &Console, query: NodesQuery) -> Result<NodesView, PageError> {
    let page = check_page(query.page)?;
    let per_page = match query.per_page.unwrap_or(NODES_PER_PAGE) {
        0 => return Err(PageError::BadRequest("per_page must be at least 1".into())),
        n if n > MAX_NODES_PER_PAGE => {
            return Err(PageError::BadRequest(format!(
                "per_page {n} is more than {MAX_NODES_PER_PAGE}"
            )))
        }
        n => n,
    };
    let nodes = console.origin.control().db().nodes()?;
    let total = nodes.len();
    let mut matching = 0;
    let mut shown = Vec::new();
    let skip = (page - 1).saturating_mul(per_page);
    for node in nodes.iter().filter(|n| matches(n, &query)) {
        if matching >= skip && shown.len() < per_page {
            shown.push(NodeLine::of(node));
        }
        matching += 1;
    }
    Ok(NodesView {
        q: query.q.unwrap_or_default(),
        site: query.site.unwrap_or_default(),
        class: query.class.unwrap_or_default(),
        version: query.version.unwrap_or_default(),
        page,
        per_page,
        matching,
        total,
        nodes: shown,
    })
}

fn render_nodes(view: &NodesView, viewer: &Viewer) -> String {
    let mut body = String::from("<h1>Nodes</h1>");
    let _ = write!(
        body,
        "<form method=\"get\" action=\"/nodes\" class=\"search\">\
         <label>Search <input name=\"q\" value=\"{}\" maxlength=\"{MAX_QUERY_VALUE_BYTES}\"></label> \
         <label>Site <input name=\"site\" value=\"{}\" maxlength=\"{MAX_QUERY_VALUE_BYTES}\"></label> \
         <label>Class <input name=\"class\" value=\"{}\" maxlength=\"{MAX_QUERY_VALUE_BYTES}\"></label> \
         <label>Version <input name=\"version\" value=\"{}\" maxlength=\"{MAX_QUERY_VALUE_BYTES}\"></label> \
         <button type=\"submit\">Search</button></form>",
        escape(&view.q),
        escape(&view.site),
        escape(&view.class),
        escape(&view.version),
    );
    let first = (view.page - 1) * view.per_page + 1;
    let last = first + view.nodes.len();
    let _ = write!(
        body,
        "<p id=\"node-count\">{} of {} nodes match; showing {}–{}.</p>",
        view.matching,
        view.total,
        if view.nodes.is_empty() { 0 } else { first },
        last.saturating_sub(1),
    );
    node_table(&mut body, &view.nodes);
    let pages = view.matching.div_ceil(view.per_page).max(1);
    body.push_str("<p class=\"pager\">");
    let link = |page: usize| {
        format!(
            "/nodes?q={}&amp;site={}&amp;class={}&amp;version={}&amp;page={page}&amp;per_page={}",
            escape(&urlencode(&view.q)),
            escape(&urlencode(&view.site)),
            escape(&urlencode(&view.class)),
            escape(&urlencode(&view.version)),
            view.per_page
        )
    };
    if view.page > 1 {
        let _ = write!(
            body,
            "<a href=\"{}\" rel=\"prev\">← previous</a> ",
            link(view.page - 1)
        );
    }
    let _ = write!(body, "page {} of {pages}", view.page);
    if view.page < pages {
        let _ = write!(
            body,
            " <a href=\"{}\" rel=\"next\">next →</a>",
            link(view.page + 1)
        );
    }
    body.push_str("</p>");
    page::layout(
        "Nodes",
        "/nodes",
        &viewer.account,
        viewer.role,
        &viewer.csrf,
        &body,
    )
}

async fn nodes(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = match parse_query::<NodesQuery>(raw) {
        Ok(query) => query,
        Err(error) => return error.into_response(),
    };
    answer(
        &console,
        &headers,
        html,
        |c| gather_nodes(c, query),
        render_nodes,
    )
}

/// `GET /api/nodes/{id}`: everything the origin's database records of one node.
#[derive(Debug, Serialize)]
pub struct NodeDetail {
    /// The record as stored: inventory, installed, held and desired bundles, state and its
    /// detail, the last report's event.
    pub node: NodeRecord,
    /// What the database records about the node's swaps, and what it does not.
    pub swap_note: &'static str,
    /// Prepare operations that name this node, newest first: (operation id, bundle, state).
    pub prepares: Vec<NodePrepare>,
    /// The node in the last rollout, if it was part of it: its swap's result as the origin
    /// saw it.
    pub last_rollout: Option<NodeRollout>,
}

/// One node's part in the last rollout.
#[derive(Debug, Serialize)]
pub struct NodeRollout {
    /// The bundle, `name@version`.
    pub bundle: String,
    /// The rollout's phase.
    pub phase: String,
    /// The version the node ran when the rollout started.
    pub previous_version: Option<String>,
    /// Where the node stands: pending, offered, healthy, failed (with what it reported),
    /// skipped (why).
    pub result: String,
}

/// A prepare operation's entry for one node.
#[derive(Debug, Serialize)]
pub struct NodePrepare {
    /// The operation.
    pub id: u64,
    /// Its bundle, `name version`.
    pub bundle: String,
    /// The node's state in it.
    pub state: String,
    /// Why.
    pub detail: String,
}

const SWAP_NOTE: &str = "The origin records each node's last report: why it reported \
     (enrolled, started, or updated after fetching what its boot plan asked for), what it \
     runs (installed), what its store holds, and whether that matches its desired bundles \
     (the state and its detail), and the node's result in the last rollout. The swap's own \
     journal and the machine's slots stay on the node (edge-agent swap status); the origin \
     does not store them.";

fn gather_node(console: &Console, id: &str) -> Result<NodeDetail, PageError> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(PageError::BadRequest(format!(
            "a node id has 1 to {MAX_ID_BYTES} bytes"
        )));
    }
    let db = console.origin.control().db();
    let node = db
        .node(id)?
        .ok_or_else(|| ApiError::NotFound(format!("no node `{}` has reported", truncate(id))))?;
    let prepares = db
        .prepares(PREPARES_LISTED)?
        .into_iter()
        .filter_map(|p| {
            p.nodes.get(id).map(|n| NodePrepare {
                id: p.id,
                bundle: format!("{} {}", p.bundle.name, p.bundle.version),
                state: n.state.name().to_owned(),
                detail: n.detail.clone(),
            })
        })
        .collect();
    let last_rollout = console
        .origin
        .control()
        .rollouts()
        .saved_status()
        .and_then(|status| {
            status.node(id).map(|n| NodeRollout {
                bundle: status.bundle.to_string(),
                phase: status.phase.to_string(),
                previous_version: n.previous_version.clone(),
                result: n.state.to_string(),
            })
        });
    Ok(NodeDetail {
        node,
        swap_note: SWAP_NOTE,
        prepares,
        last_rollout,
    })
}

fn bundle_list(bundles: &[proto::wire::NodeBundle]) -> String {
    if bundles.is_empty() {
        return "none".into();
    }
    bundles
        .iter()
        .map(|b| format!("{} {}", escape(&b.name), escape(&b.version)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn render_node(view: &NodeDetail, viewer: &Viewer) -> String {
    let node = &view.node;
    let inv = &node.inventory;
    let opt = |v: &Option<String>| escape(v.as_deref().unwrap_or("—"));
    let mut body = format!("<h1>Node {}</h1>", escape(&node.id));
    let _ = write!(
        body,
        "<h2>Slots and bundles</h2><table>\
         <tr><th>Installed</th><td id=\"installed\">{}</td></tr>\
         <tr><th>Held in its store</th><td>{}</td></tr>\
         <tr><th>Desired</th><td id=\"desired\">{}</td></tr>\
         <tr><th>State</th><td id=\"state\">{}</td></tr>\
         <tr><th>Detail</th><td>{}</td></tr>\
         <tr><th>Last report</th><td>{} ({})</td></tr>\
         <tr><th>First report</th><td>{}</td></tr>\
         <tr><th>Reports</th><td class=\"num\">{}</td></tr>\
         <tr><th>Daemon address</th><td>{}</td></tr>\
         <tr><th>Last rollout</th><td id=\"last-rollout\">{}</td></tr></table>\
         <p class=\"note\">{}</p>",
        bundle_list(&node.installed),
        bundle_list(&node.held),
        bundle_list(&node.desired),
        escape(node.state.name()),
        escape(&node.state_detail),
        escape(&format_ms(node.last_seen_ms)),
        escape(node.last_event.name()),
        escape(&format_ms(node.first_seen_ms)),
        node.reports,
        escape(&node.data_addr),
        view.last_rollout.as_ref().map_or_else(
            || "not part of the last rollout".to_owned(),
            |r| escape(&format!(
                "{} ({}): {} (ran {} before)",
                r.bundle,
                r.phase,
                r.result,
                r.previous_version.as_deref().unwrap_or("nothing")
            ))
        ),
        escape(view.swap_note),
    );
    let _ = write!(
        body,
        "<h2>Inventory</h2><table>\
         <tr><th>Site</th><td><a href=\"/nodes?site={}\">{}</a></td></tr>\
         <tr><th>Role</th><td>{}</td></tr><tr><th>Class</th><td>{}</td></tr>\
         <tr><th>Features</th><td>{}</td></tr>\
         <tr><th>Manufacturer</th><td>{}</td></tr><tr><th>Model</th><td>{}</td></tr>\
         <tr><th>Serial</th><td>{}</td></tr>\
         <tr><th>CPU</th><td>{} × {}</td></tr><tr><th>Memory bytes</th><td class=\"num\">{}</td></tr>\
         <tr><th>Address</th><td>{}</td></tr><tr><th>Subnet</th><td>{}</td></tr>",
        escape(&urlencode(&node.site)),
        escape(&node.site),
        opt(&inv.role),
        opt(&inv.class),
        escape(&inv.features.join(", ")),
        opt(&inv.manufacturer),
        opt(&inv.model),
        opt(&inv.serial),
        inv.cpu_count.map_or("—".into(), |c| c.to_string()),
        opt(&inv.cpu_model),
        inv.memory_bytes.map_or("—".into(), |m| m.to_string()),
        inv.address.map_or("—".into(), |a| a.to_string()),
        opt(&inv.subnet),
    );
    for disk in &inv.disks {
        let _ = write!(
            body,
            "<tr><th>Disk {}</th><td>{} bytes{}{}</td></tr>",
            escape(&disk.name),
            disk.size_bytes.map_or("?".into(), |s| s.to_string()),
            disk.rotational
                .map_or("", |r| if r { ", rotational" } else { ", solid state" }),
            disk.model
                .as_deref()
                .map_or(String::new(), |m| format!(", {}", escape(m))),
        );
    }
    for nic in &inv.nics {
        let _ = write!(
            body,
            "<tr><th>NIC {}</th><td>{}</td></tr>",
            escape(&nic.name),
            escape(&nic.mac)
        );
    }
    body.push_str("</table><h2>Prepare operations</h2>");
    if view.prepares.is_empty() {
        body.push_str("<p>None names this node.</p>");
    } else {
        body.push_str(
            "<table><tr><th>Operation</th><th>Bundle</th><th>State</th><th>Detail</th></tr>",
        );
        for p in &view.prepares {
            let _ = write!(
                body,
                "<tr><td><a href=\"/prepares/{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td></tr>",
                p.id,
                escape(&p.bundle),
                escape(&p.state),
                escape(&p.detail)
            );
        }
        body.push_str("</table>");
    }
    page::layout(
        "Node",
        "/nodes",
        &viewer.account,
        viewer.role,
        &viewer.csrf,
        &body,
    )
}

async fn node(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer(
        &console,
        &headers,
        html,
        |c| gather_node(c, &id),
        render_node,
    )
}

// ---- bundles ----

/// `GET /api/bundles`: every published version, newest first.
#[derive(Debug, Serialize)]
pub struct BundlesView {
    /// How "sites" is known.
    pub note: &'static str,
    /// The versions.
    pub bundles: Vec<BundleLine>,
}

/// One published version.
#[derive(Debug, Serialize)]
pub struct BundleLine {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Id (hex).
    pub id: String,
    /// Kind.
    pub kind: String,
    /// Chunks.
    pub chunk_count: u64,
    /// Stored (compressed) bytes: what a node fetches at most and a store keeps.
    pub stored_bytes: u64,
    /// Payload bytes once unpacked.
    pub raw_bytes: u64,
    /// Catalog sequence number.
    pub seq: u64,
    /// Sites where a node reported holding or running it.
    pub sites: Vec<String>,
    /// Nodes that reported holding or running it.
    pub nodes: usize,
}

const BUNDLES_NOTE: &str = "Sites are those where at least one node reported the bundle \
     installed or held in its store in its last report. Stored bytes are the compressed \
     chunks; chunks shared between versions are stored once in each store.";

fn gather_bundles(console: &Console) -> Result<BundlesView, PageError> {
    let nodes = console.origin.control().db().nodes()?;
    let mut holders: BTreeMap<proto::BundleId, (BTreeSet<String>, usize)> = BTreeMap::new();
    for node in &nodes {
        let ids: BTreeSet<_> = node
            .installed
            .iter()
            .chain(&node.held)
            .map(|b| b.id)
            .collect();
        for id in ids {
            let entry = holders.entry(id).or_default();
            entry.0.insert(node.site.clone());
            entry.1 += 1;
        }
    }
    let mut bundles: Vec<BundleLine> = console
        .origin
        .catalog()
        .all()
        .into_iter()
        .map(|b| {
            let (sites, nodes) = holders.remove(&b.id).unwrap_or_default();
            BundleLine {
                name: b.name,
                version: b.version,
                id: b.id.to_string(),
                kind: b.kind.to_string(),
                chunk_count: b.chunk_count,
                stored_bytes: b.stored_bytes,
                raw_bytes: b.raw_bytes,
                seq: b.seq,
                sites: sites.into_iter().collect(),
                nodes,
            }
        })
        .collect();
    bundles.sort_by_key(|b| std::cmp::Reverse(b.seq));
    Ok(BundlesView {
        note: BUNDLES_NOTE,
        bundles,
    })
}

fn render_bundles(view: &BundlesView, viewer: &Viewer) -> String {
    let mut body = format!(
        "<h1>Bundles</h1><p class=\"note\">{}</p>",
        escape(view.note)
    );
    if view.bundles.is_empty() {
        body.push_str("<p>Nothing is published yet.</p>");
    } else {
        body.push_str(
            "<table><tr><th>Name</th><th>Version</th><th>Kind</th><th>Stored bytes</th><th>Payload bytes</th><th>Chunks</th><th>Nodes</th><th>Sites</th><th>Id</th></tr>",
        );
        for b in &view.bundles {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td></tr>",
                escape(&b.name),
                escape(&b.version),
                escape(&b.kind),
                b.stored_bytes,
                b.raw_bytes,
                b.chunk_count,
                b.nodes,
                b.sites
                    .iter()
                    .map(|s| format!("<a href=\"/sites#site-{0}\">{0}</a>", escape(s)))
                    .collect::<Vec<_>>()
                    .join(", "),
                escape(&b.id.chars().take(16).collect::<String>()),
            );
        }
        body.push_str("</table>");
    }
    page::layout(
        "Bundles",
        "/bundles",
        &viewer.account,
        viewer.role,
        &viewer.csrf,
        &body,
    )
}

async fn bundles(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    headers: HeaderMap,
) -> Response {
    answer(&console, &headers, html, gather_bundles, render_bundles)
}

// ---- prepares ----

/// `GET /api/prepares`: the newest operations, newest first.
#[derive(Debug, Serialize)]
pub struct PreparesView {
    /// The operations.
    pub prepares: Vec<PrepareSummary>,
}

/// One prepare operation, counted per site.
#[derive(Debug, Serialize)]
pub struct PrepareSummary {
    /// Its id.
    pub id: u64,
    /// Its bundle, `name version`.
    pub bundle: String,
    /// Stored bytes of the bundle.
    pub stored_bytes: u64,
    /// The selector.
    pub selector: String,
    /// Who started it.
    pub actor: String,
    /// When (ms since the Unix epoch).
    pub created_ms: u64,
    /// Whether no node waits for an answer any more.
    pub settled: bool,
    /// When and by whom it was cancelled, if it was.
    pub cancelled: Option<crate::db::PrepareCancel>,
    /// Per site: nodes per state.
    pub sites: Vec<SiteLine>,
}

impl PrepareSummary {
    /// Where it stands, in words: cancelled (when, by whom), settled or in progress.
    fn standing(&self) -> String {
        match &self.cancelled {
            Some(c) => format!("cancelled at {} by {}", format_ms(c.at_ms), c.actor),
            None if self.settled => "settled".to_owned(),
            None => "in progress".to_owned(),
        }
    }
}

/// One site's progress in a prepare operation: the counts `origin prepare status` shows.
#[derive(Debug, Serialize)]
pub struct SiteLine {
    /// The site.
    pub site: String,
    /// Its nodes per state, and bytes.
    #[serde(flatten)]
    pub progress: crate::control::SiteProgress,
}

/// `GET /api/prepares/{id}`: one operation, per site and per node.
#[derive(Debug, Serialize)]
pub struct PrepareDetail {
    /// The summary.
    pub summary: PrepareSummary,
    /// Every node of it.
    pub nodes: Vec<PrepareNodeLine>,
}

/// One node of a prepare operation.
#[derive(Debug, Serialize)]
pub struct PrepareNodeLine {
    /// Node id.
    pub id: String,
    /// Site.
    pub site: String,
    /// State.
    pub state: String,
    /// Why.
    pub detail: String,
    /// Times its daemon was asked.
    pub attempts: u32,
    /// Bytes received.
    pub bytes_received: u64,
    /// When the state last changed.
    pub updated_ms: u64,
}

fn summarize(record: &crate::db::PrepareRecord) -> PrepareSummary {
    let sites = crate::control::PrepareStatus::sites_of(record, &BTreeMap::new())
        .into_iter()
        .map(|(site, progress)| SiteLine { site, progress })
        .collect();
    PrepareSummary {
        id: record.id,
        bundle: format!("{} {}", record.bundle.name, record.bundle.version),
        stored_bytes: record.stored_bytes,
        selector: record.selector.clone(),
        actor: record.actor.clone(),
        created_ms: record.created_ms,
        settled: record.settled(),
        cancelled: record.cancelled.clone(),
        sites,
    }
}

fn gather_prepares(console: &Console) -> Result<PreparesView, PageError> {
    let records = console.origin.control().db().prepares(PREPARES_LISTED)?;
    Ok(PreparesView {
        prepares: records.iter().map(summarize).collect(),
    })
}

fn progress_table(body: &mut String, sites: &[SiteLine]) {
    body.push_str(
        "<table><tr><th>Site</th><th>Prepared</th><th>Fetching</th><th>Pending</th><th>Failed</th><th>Cancelled</th><th>Bytes received</th></tr>",
    );
    for s in sites {
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&s.site),
            s.progress.prepared,
            s.progress.fetching,
            s.progress.pending,
            s.progress.failed,
            s.progress.cancelled,
            s.progress.bytes_received
        );
    }
    body.push_str("</table>");
}

fn render_prepares(view: &PreparesView, viewer: &Viewer) -> String {
    let mut body = String::from("<h1>Prepare operations</h1>");
    if view.prepares.is_empty() {
        body.push_str(
            "<p>No prepare operation yet (<code>origin prepare BUNDLE --to SELECTOR</code>).</p>",
        );
    }
    for p in &view.prepares {
        let _ = write!(
            body,
            "<h2><a href=\"/prepares/{0}\">Operation {0}</a>: {1}</h2><p>To <code>{2}</code> by {3} at {4}; {5}.</p>",
            p.id,
            escape(&p.bundle),
            escape(&p.selector),
            escape(&p.actor),
            escape(&format_ms(p.created_ms)),
            escape(&p.standing()),
        );
        progress_table(&mut body, &p.sites);
    }
    page::layout(
        "Prepare",
        "/prepares",
        &viewer.account,
        viewer.role,
        &viewer.csrf,
        &body,
    )
}

fn gather_prepare(console: &Console, id: &str) -> Result<PrepareDetail, PageError> {
    let id: u64 = id.parse().map_err(|_| {
        PageError::BadRequest(format!(
            "`{}` is not a prepare operation id (a number)",
            truncate(id)
        ))
    })?;
    let record = console
        .origin
        .control()
        .db()
        .prepare(id)?
        .ok_or_else(|| ApiError::NotFound(format!("no prepare operation {id}")))?;
    Ok(PrepareDetail {
        summary: summarize(&record),
        nodes: record
            .nodes
            .iter()
            .map(|(id, n)| PrepareNodeLine {
                id: id.clone(),
                site: n.site.clone(),
                state: n.state.name().to_owned(),
                detail: n.detail.clone(),
                attempts: n.attempts,
                bytes_received: n.bytes_received,
                updated_ms: n.updated_ms,
            })
            .collect(),
    })
}

fn render_prepare(view: &PrepareDetail, viewer: &Viewer) -> String {
    let p = &view.summary;
    let mut body = format!(
        "<h1>Prepare operation {}: {}</h1><p>To <code>{}</code> by {} at {}; {} stored bytes; {}.</p><h2>Per site</h2>",
        p.id,
        escape(&p.bundle),
        escape(&p.selector),
        escape(&p.actor),
        escape(&format_ms(p.created_ms)),
        p.stored_bytes,
        escape(&p.standing()),
    );
    progress_table(&mut body, &p.sites);
    body.push_str(
        "<h2>Nodes</h2><table><tr><th>Node</th><th>Site</th><th>State</th><th>Attempts</th><th>Bytes received</th><th>Updated</th><th>Detail</th></tr>",
    );
    for n in &view.nodes {
        let _ = write!(
            body,
            "<tr><td><a href=\"/nodes/{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&urlencode(&n.id)),
            escape(&n.id),
            escape(&n.site),
            escape(&n.state),
            n.attempts,
            n.bytes_received,
            escape(&format_ms(n.updated_ms)),
            escape(&n.detail),
        );
    }
    body.push_str("</table>");
    page::layout(
        "Prepare",
        "/prepares",
        &viewer.account,
        viewer.role,
        &viewer.csrf,
        &body,
    )
}

async fn prepares(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    headers: HeaderMap,
) -> Response {
    answer(&console, &headers, html, gather_prepares, render_prepares)
}

async fn prepare(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer(
        &console,
        &headers,
        html,
        |c| gather_prepare(c, &id),
        render_prepare,
    )
}

// ---- audit ----

/// The query of `/audit`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Page, from 1 (newest first).
    #[serde(default)]
    pub page: Option<usize>,
}

/// `GET /api/audit`: one page of the audit log, newest first.
#[derive(Debug, Serialize)]
pub struct AuditView {
    /// This page, from 1.
    pub page: usize,
    /// Records per page.
    pub per_page: usize,
    /// Whether an older page exists (within the most recent records the database lists).
    pub older: bool,
    /// The records.
    pub records: Vec<crate::db::AuditRecord>,
}

fn gather_audit(console: &Console, query: AuditQuery) -> Result<AuditView, PageError> {
    let page = check_page(query.page)?;
    let reach = page.saturating_mul(AUDIT_PER_PAGE);
    if reach > crate::db::MAX_AUDIT_LISTING {
        return Err(PageError::BadRequest(format!(
            "the console lists the newest {} audit records; page {page} is beyond them (origin audit reads the database)",
            crate::db::MAX_AUDIT_LISTING
        )));
    }
    // One more than this page reaches, to know whether an older page exists.
    let mut records = console.origin.control().db().audit(reach + 1)?;
    records.reverse();
    let older = records.len() > reach;
    let records = records
        .into_iter()
        .skip((page - 1) * AUDIT_PER_PAGE)
        .take(AUDIT_PER_PAGE)
        .collect();
    Ok(AuditView {
        page,
        per_page: AUDIT_PER_PAGE,
        older,
        records,
    })
}

fn render_audit(view: &AuditView, viewer: &Viewer) -> String {
    let mut body = String::from("<h1>Audit log</h1>");
    if view.records.is_empty() {
        body.push_str("<p>No record on this page.</p>");
    } else {
        body.push_str(
            "<table><tr><th>#</th><th>When</th><th>Who</th><th>As</th><th>Action</th><th>Detail</th></tr>",
        );
        for r in &view.records {
            let _ = write!(
                body,
                "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                r.seq,
                escape(&format_ms(r.at_ms)),
                escape(&r.actor),
                escape(&r.role),
                escape(&r.action),
                escape(&r.detail),
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<p class=\"pager\">");
    if view.page > 1 {
        let _ = write!(
            body,
            "<a href=\"/audit?page={}\" rel=\"prev\">← newer</a> ",
            view.page - 1
        );
    }
    let _ = write!(body, "page {}", view.page);
    if view.older {
        let _ = write!(
            body,
            " <a href=\"/audit?page={}\" rel=\"next\">older →</a>",
            view.page + 1
        );
    }
    body.push_str("</p>");
    page::layout(
        "Audit log",
        "/audit",
        &viewer.account,
        viewer.role,
        &viewer.csrf,
        &body,
    )
}

async fn audit(
    State(console): State<Arc<Console>>,
    Format { html }: Format,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = match parse_query::<AuditQuery>(raw) {
        Ok(query) => query,
        Err(error) => return error.into_response(),
    };
    answer(
        &console,
        &headers,
        html,
        |c| gather_audit(c, query),
        render_audit,
    )
}

// ---- helpers ----

/// Percent-encodes a query value or path segment.
fn urlencode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            other => {
                let _ = write!(out, "%{other:02X}");
            }
        }
    }
    out
}

/// A time in ms since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC` (never: `—`).
fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "—".into();
    }
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil: (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_and_encodes_values() {
        assert_eq!(format_ms(0), "—");
        assert_eq!(format_ms(1_000), "1970-01-01 00:00:01 UTC");
        assert_eq!(format_ms(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
        assert_eq!(urlencode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn refuses_unknown_and_oversized_query_parameters() {
        let ok: NodesQuery = parse_query(Some("q=web&site=fra1&page=2".into()))
            .ok()
            .expect("parses");
        assert_eq!((ok.q.as_deref(), ok.page), (Some("web"), Some(2)));
        assert!(parse_query::<NodesQuery>(Some("nope=1".into())).is_err());
        assert!(parse_query::<NodesQuery>(Some("page=x".into())).is_err());
        let long = format!("q={}", "a".repeat(MAX_QUERY_VALUE_BYTES + 1));
        assert!(parse_query::<NodesQuery>(Some(long)).is_err());
        assert!(check_page(Some(0)).is_err());
        assert!(check_page(Some(MAX_PAGE + 1)).is_err());
        assert_eq!(check_page(None).ok(), Some(1));
    }
}
