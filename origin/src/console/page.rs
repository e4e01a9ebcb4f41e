//! The console's HTML, rendered on the server: every text from the database is escaped, and
//! the page loads nothing but the origin's own stylesheet and script ([`JS`]).

use std::fmt::Write as _;

use super::live::{Counts, RolloutProgress};
use super::overview::Overview;
use crate::db::AccountRole;

/// The stylesheet, served at [`super::CSS_PATH`].
pub const CSS: &str = "\
body{font-family:system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;justify-content:space-between;align-items:center}\
header form,form.inline{display:inline}\
header nav a{color:#fff;margin:0 .6em;text-decoration:none}\
header nav a[aria-current]{text-decoration:underline}\
.note{color:#555;max-width:60em}\
form.search label{margin-right:.6em}\
main{padding:1em 1.2em;max-width:72em}\
h2{font-size:1.1em;margin-top:1.6em}\
table{border-collapse:collapse;background:#fff;min-width:30em}\
th,td{border:1px solid #d5d9e0;padding:.3em .6em;text-align:left}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
button{cursor:pointer}\
.error{color:#a11}\
.login{max-width:22em;margin:4em auto;background:#fff;padding:1.5em;border:1px solid #d5d9e0}\
.login label{display:block;margin:.6em 0}\
.login input{width:100%;box-sizing:border-box}\
header a{color:#fff}\
tr.current{background:#eef4ff}\
td.done{color:#2b8a3e}td.failed{color:#c92a2a}\
.live{color:#2b8a3e}.stale{color:#a11}\
#progress-chart svg{background:#fff;max-width:100%;height:auto}\
";

/// The live pages' script, served at [`super::JS_PATH`].
pub const JS: &str = include_str!("console.js");

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Stagecoach</title><link rel=\"stylesheet\" href=\"{}\"></head>",
        escape(title),
        super::CSS_PATH
    )
}

/// The console's pages, in the order of the navigation bar.
pub const NAV: [(&str, &str); 6] = [
    ("/", "Overview"),
    ("/sites", "Sites"),
    ("/nodes", "Nodes"),
    ("/bundles", "Bundles"),
    ("/prepares", "Prepare"),
    ("/audit", "Audit log"),
];

/// The navigation bar, with `current` (one of [`NAV`]'s paths) marked.
pub fn nav(current: &str) -> String {
    let mut nav = String::from("<nav>");
    for (path, label) in NAV {
        let mark = if path == current {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(nav, "<a href=\"{path}\"{mark}>{label}</a>");
    }
    nav.push_str("</nav>");
    nav
}

/// The start of a page, up to and with `<main>`: the `<body>` (with `body_attrs`, already
/// escaped), the CSRF meta tag for scripts, the header with the navigation bar (`current`
/// marked) and the account with its log-out form. Every page after log-in starts with it.
pub fn open_page(
    title: &str,
    body_attrs: &str,
    current: &str,
    account: &str,
    role: AccountRole,
    csrf: &str,
) -> String {
    let csrf = escape(csrf);
    let mut page = head(title);
    let _ = write!(
        page,
        "<body{body_attrs}><meta name=\"csrf-token\" content=\"{csrf}\"><header><strong>Stagecoach</strong>{}\
         <span>{} ({}) <form method=\"post\" action=\"/logout\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">Log out</button></form></span>\
         </header><main>",
        nav(current),
        escape(account),
        escape(role.name()),
    );
    page
}

/// A whole page: [`open_page`], then `body` (already escaped HTML). Viewers and admins get
/// the same chrome; pages that offer changes check `role` themselves.
pub fn layout(
    title: &str,
    current: &str,
    account: &str,
    role: AccountRole,
    csrf: &str,
    body: &str,
) -> String {
    let mut page = open_page(title, "", current, account, role, csrf);
    page.push_str(body);
    page.push_str("</main></body></html>");
    page
}

/// The login form, with `error` above it when not empty.
pub fn login(error: &str) -> String {
    let error = if error.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\" role=\"alert\">{}</p>", escape(error))
    };
    format!(
        "{}<body><form class=\"login\" method=\"post\" action=\"/login\">\
         <h1>Stagecoach console</h1>{error}\
         <label>Name <input name=\"name\" autocomplete=\"username\" required autofocus></label>\
         <label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>\
         <button type=\"submit\">Log in</button></form></body></html>",
        head("Log in")
    )
}

/// The overview page; `csrf` goes into every form (and a meta tag for scripts to come).
pub fn overview(view: &Overview, role: AccountRole, csrf: &str) -> String {
    let mut page = open_page(
        "Overview",
        &format!(
            " data-page=\"overview\" data-rollouts=\"{}\"",
            escape(
                &view
                    .rollouts
                    .iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        ),
        "/",
        &view.account.name,
        role,
        csrf,
    );
    let csrf = escape(csrf);
    let _ = write!(
        page,
        "<h2>Sites</h2><p><span id=\"overview-nodes\">{}</span> nodes reported. <span id=\"live-status\"></span></p>\
         <table><thead><tr><th>Site</th><th>Stagers up</th><th>Edges</th><th>WAN bytes from the origin</th><th>Bytes stagers served</th></tr></thead><tbody id=\"overview-site-rows\">",
        view.nodes
    );
    for site in &view.sites {
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            escape(&site.site),
            site.stagers,
            site.edges,
            site.wan_bytes_from_origin,
            site.served_by_stagers
        );
    }
    page.push_str("</tbody></table>");

    page.push_str("<h2>Rollouts</h2><p id=\"overview-rollout-note\"></p>");
    if view.rollouts.is_empty() {
        page.push_str("<p>No rollout is running.</p>");
    }
    for rollout in &view.rollouts {
        let status = &rollout.status;
        let nodes: usize = status.waves.iter().map(|w| w.nodes.len()).sum();
        let wave = status
            .current_wave
            .map(|w| format!("{} of {}", w + 1, status.waves.len()))
            .unwrap_or_else(|| "none".into());
        let done = status
            .waves
            .iter()
            .flat_map(|w| &w.nodes)
            .filter(|n| n.state == crate::rollout::plan::NodeState::Healthy)
            .count();
        let _ = write!(
            page,
            "<table><tr><th>Bundle</th><td><a href=\"/rollouts/{}\">{}</a></td></tr><tr><th>Phase</th><td id=\"rollout-phase\">{}</td></tr>\
             <tr><th>Wave</th><td id=\"rollout-wave\">{}</td></tr><tr><th>Nodes</th><td class=\"num\">{nodes}</td></tr>\
             <tr><th>Done</th><td class=\"num\" id=\"rollout-done\">{done} of {nodes}</td></tr>\
             <tr><th>Failures</th><td class=\"num\">{} (allowed {})</td></tr></table>",
            escape(&rollout.id),
            escape(&status.bundle.to_string()),
            escape(&status.phase.to_string()),
            escape(&wave),
            status.failed,
            status.allowed_failures,
        );
        if role == AccountRole::Admin {
            page.push_str("<p>");
            for action in ["pause", "resume", "abort"] {
                let _ = write!(
                    page,
                    "<form method=\"post\" action=\"/api/rollouts/{}/{action}\" class=\"inline\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">{action}</button></form> ",
                    escape(&rollout.id),
                );
            }
            page.push_str("</p>");
        }
    }

    page.push_str(
        "<h2>Bundles</h2><table><tr><th>Name</th><th>Version</th><th>Kind</th><th>Stored bytes</th><th>Payload bytes</th><th>Id</th></tr>",
    );
    for bundle in view.bundles.iter().rev() {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td><code>{}</code></td></tr>",
            escape(&bundle.name),
            escape(&bundle.version),
            escape(&bundle.kind),
            bundle.stored_bytes,
            bundle.raw_bytes,
            escape(&bundle.id.chars().take(16).collect::<String>()),
        );
    }
    let _ = write!(
        page,
        "</table></main><script src=\"{}\"></script></body></html>",
        super::JS_PATH
    );
    page
}

fn counts_cells(page: &mut String, counts: &Counts) {
    let _ = write!(
        page,
        "<td class=\"num done\">{}</td><td class=\"num failed\">{}</td><td class=\"num offered\">{}</td>\
         <td class=\"num pending\">{}</td><td class=\"num total\">{}</td></tr>",
        counts.done, counts.failed, counts.offered, counts.pending, counts.total
    );
}

const COUNTS_HEAD: &str =
    "<th>Done</th><th>Failed</th><th>Offered</th><th>Pending</th><th>Nodes</th></tr></thead>";

/// The rollout page: phase, per-site progress and its chart, waves and failures, and the
/// buttons for admins; `console.js` keeps it current from `/api/events`.
pub fn rollout(progress: &RolloutProgress, account: &str, role: AccountRole, csrf: &str) -> String {
    let id = escape(&progress.id);
    let mut page = open_page(
        &format!("Rollout of {}", progress.bundle),
        &format!(" data-page=\"rollout\" data-rollout=\"{id}\""),
        "",
        account,
        role,
        csrf,
    );
    let csrf = escape(csrf);
    let _ = write!(
        page,
        "<h1>Rollout of <span id=\"rollout-bundle\">{}</span></h1>\
         <p>Phase <strong id=\"rollout-phase\">{}</strong> · wave <span id=\"rollout-wave\">{}</span> · \
         failures <span id=\"rollout-failed\">{}</span> (allowed <span id=\"rollout-allowed\">{}</span>) · \
         <span id=\"live-status\"></span></p>",
        escape(&progress.bundle),
        escape(&progress.phase),
        progress
            .current_wave
            .map(|w| format!("{} of {}", w + 1, progress.waves.len()))
            .unwrap_or_else(|| "none".into()),
        progress.failed,
        progress.allowed_failures,
    );
    if role == AccountRole::Admin {
        let _ = write!(
            page,
            "<p id=\"rollout-actions\"{}>",
            if progress.under_way { "" } else { " hidden" }
        );
        for action in ["pause", "resume", "abort"] {
            let _ = write!(
                page,
                "<form method=\"post\" action=\"/api/rollouts/{id}/{action}\" class=\"inline rollout-action\" data-action=\"{action}\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\" id=\"rollout-{action}\">{action}</button></form> ",
            );
        }
        page.push_str("<span id=\"action-result\" role=\"status\"></span></p>");
    }
    let _ = write!(
        page,
        "<h2>Progress per site</h2><table id=\"site-progress\"><thead><tr><th>Site</th>{COUNTS_HEAD}<tbody id=\"site-progress-rows\">"
    );
    for site in &progress.sites {
        let _ = write!(
            page,
            "<tr data-site=\"{0}\"><td>{0}</td>",
            escape(&site.site)
        );
        counts_cells(&mut page, &site.counts);
    }
    page.push_str(
        "</tbody></table><h2>Done per site since this page opened</h2><div id=\"progress-chart\"></div>",
    );
    let _ = write!(
        page,
        "<h2>Waves</h2><table id=\"waves\"><thead><tr><th>Wave</th>{COUNTS_HEAD}<tbody id=\"wave-rows\">"
    );
    for wave in &progress.waves {
        let current = progress.current_wave == Some(wave.index);
        let _ = write!(
            page,
            "<tr{}><td>{}: {} ({})</td>",
            if current { " class=\"current\"" } else { "" },
            wave.index + 1,
            escape(&wave.site),
            escape(&wave.kind)
        );
        counts_cells(&mut page, &wave.counts);
    }
    page.push_str(
        "</tbody></table><h2>Failures</h2><table id=\"failures\"><thead><tr><th>Node</th><th>Site</th><th>Reason</th></tr></thead><tbody id=\"failure-rows\">",
    );
    for failure in &progress.failures {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&failure.node),
            escape(&failure.site),
            escape(&failure.reason)
        );
    }
    let _ = write!(
        page,
        "</tbody></table></main><script src=\"{}\"></script></body></html>",
        super::JS_PATH
    );
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
        assert!(login("<b>").contains("&lt;b&gt;"));
    }
}
