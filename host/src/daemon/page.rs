//! The status page the metrics listener serves at `/`: what `greyhook
//! status` says, with bar charts (inline SVG) of the decisions and of each
//! filter's histograms. One self-contained HTML document: no scripts, no
//! external stylesheets, fonts or images, so it works on a host with no
//! Internet and passes a strict Content-Security-Policy.

use std::fmt::Write;

use super::status::Status;
use crate::report::{bar_chart, esc};

/// A bucket bound in words (`≤ 5 min`).
fn bound(b: &serde_json::Value) -> String {
    match b.as_f64() {
        Some(x) if x >= 3600.0 => format!("≤ {} h", x / 3600.0),
        Some(x) if x >= 60.0 => format!("≤ {} min", x / 60.0),
        Some(x) if x >= 1.0 => format!("≤ {x} s"),
        Some(x) => format!("≤ {} ms", x * 1000.0),
        None => "more".into(),
    }
}

/// The whole page.
pub(super) fn render(st: &Status) -> String {
    let v = serde_json::to_value(st).unwrap_or_default();
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>greyhook {}</h1><p>up {} s, since {}</p>",
        esc(v["version"].as_str().unwrap_or("")),
        v["uptime_seconds"],
        esc(v["started_at"].as_str().unwrap_or(""))
    );
    body.push_str("<h2>Listeners</h2><ul>");
    for l in v["listeners"].as_array().into_iter().flatten() {
        let addrs: Vec<String> = l["addresses"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).map(esc).collect();
        let c = &l["connections"];
        let counts = match c.is_object() {
            true => format!(
                " — connections: {} active, {} since start, {} refused (all slots taken), {} refused (per-client limit)",
                c["active"], c["total"], c["refused"], c["refused_per_client"]
            ),
            false => String::new(),
        };
        let _ = write!(body, "<li><b>{}</b> {}{counts}</li>", esc(l["name"].as_str().unwrap_or("")), addrs.join(", "));
    }
    body.push_str("</ul>");
    let s = &v["store"];
    let _ = write!(
        body,
        "<h2>Store</h2><table><tr><th>kind</th><td>{}</td></tr><tr><th>where</th><td>{}</td></tr><tr><th>size</th><td>{}</td></tr>\
         <tr><th>records</th><td>{}</td></tr><tr><th>health</th><td class=\"{h}\">{h}</td></tr><tr><th>failures</th><td>{}</td></tr></table>",
        esc(s["kind"].as_str().unwrap_or("")),
        esc(s["path"].as_str().unwrap_or("")),
        s["size_bytes"].as_u64().map_or("-".into(), |b| format!("{b} bytes")),
        s["records"].as_u64().map_or("-".into(), |n| n.to_string()),
        s["failures"],
        h = esc(s["health"].as_str().unwrap_or("")),
    );
    let decisions: Vec<(String, f64)> =
        v["decisions"].as_object().into_iter().flatten().map(|(k, n)| (k.clone(), n.as_f64().unwrap_or(0.0))).collect();
    body.push_str("<h2>Decisions since start</h2>");
    body.push_str(&bar_chart("decisions by action", &decisions));
    // The last day, hour by hour: what was greylisted and what passed.
    let hours = v["last_day"].as_array().cloned().unwrap_or_default();
    if !hours.is_empty() {
        let per_hour = |action: &str| -> Vec<(String, f64)> {
            hours
                .iter()
                .map(|h| {
                    let label = h["hour"].as_str().unwrap_or("").get(..16).unwrap_or("").replace('T', " ");
                    (label, h["decisions"][action].as_f64().unwrap_or(0.0))
                })
                .collect()
        };
        body.push_str("<h2>The last 24 hours</h2>");
        body.push_str(&bar_chart("greylisted per hour (UTC)", &per_hour("greylist")));
        body.push_str(&bar_chart("passed per hour (UTC)", &per_hour("pass")));
    }
    let certs = v["certificates"].as_array().cloned().unwrap_or_default();
    if !certs.is_empty() {
        body.push_str("<h2>Certificates</h2><table><tr><th>role</th><th>file</th><th>expires</th><th>days left</th></tr>");
        for c in &certs {
            let days = c["days_left"].as_i64().unwrap_or(0);
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{days}</td></tr>",
                esc(c["role"].as_str().unwrap_or("")),
                esc(c["path"].as_str().unwrap_or("")),
                esc(c["expires_at"].as_str().unwrap_or("")),
                if days < crate::pem::EXPIRY_WARNING_DAYS { "bad" } else { "ok" }
            );
        }
        body.push_str("</table>");
    }
    let d = &v["dns"];
    let _ = write!(
        body,
        "<h2>DNS</h2><p>{} lookups, {} failed, {} cut off by a hook's deadline</p>",
        d["lookups"], d["failures"], d["cut_by_deadline"]
    );
    body.push_str("<h2>Filters</h2>");
    let c = &v["compiled_filters"];
    let _ = match c["dir"].as_str() {
        Some(dir) => write!(body, "<p>compiled filters in {}: {} artifacts, {} bytes</p>", esc(dir), c["artifacts"], c["size_bytes"]),
        None => write!(body, "<p>compiled filters: not cached (compiled at every start)</p>"),
    };
    for f in v["filters"].as_array().into_iter().flatten() {
        let _ = write!(
            body,
            "<h3>{} {}</h3><p>namespace {}, contract {}, {} calls, {} failures</p>",
            esc(f["name"].as_str().unwrap_or("")),
            esc(f["version"].as_str().unwrap_or("")),
            esc(f["namespace"].as_str().unwrap_or("")),
            esc(f["contract"].as_str().unwrap_or("")),
            f["calls"],
            f["failures"]
        );
        match f["last_reload"].as_object() {
            Some(r) => {
                let _ = write!(
                    body,
                    "<p>last reload {}: <span class=\"{}\">{}</span></p>",
                    esc(r["at"].as_str().unwrap_or("")),
                    if r["ok"].as_bool() == Some(true) { "ok" } else { "bad" },
                    esc(r["result"].as_str().unwrap_or(""))
                );
            }
            None => body.push_str("<p>no reload since start</p>"),
        }
        let mut counters = Vec::new();
        for m in f["metrics"].as_array().into_iter().flatten() {
            let labels: Vec<String> =
                m["labels"].as_object().into_iter().flatten().map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or(""))).collect();
            let name = format!(
                "{}{}",
                m["name"].as_str().unwrap_or(""),
                if labels.is_empty() { String::new() } else { format!(" {}", labels.join(",")) }
            );
            if let Some(n) = m["value"].as_f64() {
                counters.push((name, n));
            } else if let Some(buckets) = m["value"]["buckets"].as_array() {
                let bars: Vec<(String, f64)> = m["value"]["bounds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .zip(buckets)
                    .map(|(b, n)| (bound(b), n.as_f64().unwrap_or(0.0)))
                    .collect();
                body.push_str(&bar_chart(&name, &bars));
            }
        }
        if !counters.is_empty() {
            body.push_str(&bar_chart("counters", &counters));
        }
    }
    crate::report::page("greyhook status", &body)
}
