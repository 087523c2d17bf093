//! The status page: server-rendered HTML, no build step. Per org the two bars admins know from
//! their sales tools ("Total API calls used" against the limit, "API usage threshold" against
//! the threshold), a bar per integration (against its quota, or the org's limit without one),
//! queue depths, the last 7 days, and a form to change the threshold. Green below 80 %, orange
//! to 90 %, red from 90 %. The live part is fetched again every few seconds by `status.js`
//! (`?part=live`); without JavaScript the page reloads itself. Every text is escaped.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::history::HistoryReport;
use crate::markup::escape;
use crate::meter::{Level, OrgReport, Usage};
use crate::notify::mail::{color_name, thousands};
use crate::notify::{self, Source, Thresholds};

pub const SCRIPT: &str = include_str!("status.js");
const STYLE: &str = include_str!("status.css");
/// Seconds between refreshes (the script's interval is the same).
const REFRESH_SECS: u32 = 5;

pub struct PageData<'a> {
    pub usage: Usage,
    pub thresholds: &'a Thresholds,
    pub history: Option<HistoryReport>,
    /// When the figures were read, in the history's time zone.
    pub updated: String,
    pub token_set: bool,
    pub token_env: &'a str,
}

/// The whole page.
pub fn page(data: &PageData<'_>) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>callmeter: Salesforce API usage</title>\
         <noscript><meta http-equiv=\"refresh\" content=\"{}\"></noscript>\
         <style>{STYLE}</style></head><body>\
         <header><div class=\"wrap\"><h1>callmeter</h1><p>Salesforce API usage</p></div></header>\
         <main class=\"wrap\"><div id=\"live\" aria-live=\"polite\">",
        REFRESH_SECS * 2
    );
    h.push_str(&live(data));
    h.push_str("</div>");
    form(&mut h, data);
    h.push_str(
        "</main><footer class=\"wrap\"><p>JSON: <a href=\"/api/v1/usage\">/api/v1/usage</a> · \
         <a href=\"/api/v1/history?days=7\">/api/v1/history</a> · \
         <a href=\"/metrics\">/metrics</a></p></footer>\
         <script src=\"/status.js\" defer></script></body></html>\n",
    );
    h
}

/// The part that refreshes: every org's card.
pub fn live(data: &PageData<'_>) -> String {
    let mut h = String::with_capacity(8 * 1024);
    let _ = write!(
        h,
        "<p class=\"updated\">Updated {} <span id=\"stale\" class=\"stale\" hidden>· not refreshing</span></p>",
        escape(&data.updated)
    );
    for org in &data.usage.orgs {
        org_card(&mut h, org, data);
    }
    h
}

fn org_card(h: &mut String, org: &OrgReport, data: &PageData<'_>) {
    let id = escape(&org.id);
    let _ = write!(
        h,
        "<section class=\"card org\" data-org=\"{id}\"><h2>{id}{}</h2>",
        if org.exhausted {
            " <span class=\"badge red\">limit reached: Salesforce refuses calls</span>"
        } else {
            ""
        }
    );
    let source = match org.reported_used {
        Some(_) => "Salesforce's last report plus the calls since",
        None => "the calls counted by callmeter (no report from Salesforce yet)",
    };
    let _ = write!(
        h,
        "<p class=\"meta\">Usage in the last {}, from {source}.</p>",
        window_text(org.window_minutes)
    );

    // Total API calls used.
    match org.limit {
        Some(limit) => bar(
            h,
            "total",
            None,
            "Total API calls used",
            org.used,
            limit,
            &format!("{} / {}", thousands(org.used), thousands(limit)),
        ),
        None => unknown_bar(
            h,
            "total",
            "Total API calls used",
            &format!("{} · limit not known yet", thousands(org.used)),
        ),
    }

    // API usage threshold.
    let (threshold, source) = data.thresholds.get(&org.id).unwrap_or((None, Source::None));
    match org.threshold {
        Some(t) if t > 0 => bar(
            h,
            "threshold",
            None,
            "API usage threshold",
            org.used,
            t,
            &format!("{} / {}", thousands(org.used), thousands(t)),
        ),
        _ if threshold.is_some() => unknown_bar(
            h,
            "threshold",
            "API usage threshold",
            "applies once the daily limit is known",
        ),
        _ => unknown_bar(h, "threshold", "API usage threshold", "No threshold"),
    }
    if let Some(t) = &threshold {
        let levels: Vec<String> = t.levels.iter().map(|l| l.to_string()).collect();
        let notify = if t.notify.is_empty() {
            "nobody (no notify addresses)".to_owned()
        } else {
            t.notify.join(", ")
        };
        let _ = write!(
            h,
            "<p class=\"meta\">Threshold levels {} ({}); email to {}, at most one per {} unless a higher level is crossed.</p>",
            escape(&levels.join(", ")),
            match source {
                Source::Runtime => "set through the admin API",
                _ => "from the config file",
            },
            escape(&notify),
            escape(&humantime::format_duration(t.min_interval).to_string())
        );
    }

    // Integrations.
    let waiting: u64 = org.integrations.iter().map(|i| i.queue_depth).sum();
    let _ = write!(
        h,
        "<h3>Integrations</h3><p class=\"meta\" data-queue-depth=\"{waiting}\">Queue depth: {} waiting</p>",
        thousands(waiting)
    );
    let mut integrations: Vec<_> = org.integrations.iter().collect();
    integrations.sort_by(|a, b| b.window.cmp(&a.window).then_with(|| a.id.cmp(&b.id)));
    for i in integrations {
        let extra = {
            let mut parts = Vec::new();
            if i.queue_depth > 0 {
                parts.push(format!("{} waiting", thousands(i.queue_depth)));
            }
            if i.rejections > 0 {
                parts.push(format!("{} held back since start", thousands(i.rejections)));
            }
            parts.join(" · ")
        };
        match (i.quota, org.limit) {
            (Some(q), _) => bar(
                h,
                "integration",
                Some((&i.id, i.queue_depth)),
                &i.id,
                i.window,
                q,
                &format!("{} / quota {}", thousands(i.window), thousands(q)),
            ),
            (None, Some(l)) => bar(
                h,
                "integration",
                Some((&i.id, i.queue_depth)),
                &i.id,
                i.window,
                l,
                &format!("{} of the limit", thousands(i.window)),
            ),
            (None, None) => unknown_bar(h, "integration", &i.id, &thousands(i.window)),
        }
        if !extra.is_empty() {
            let _ = write!(h, "<p class=\"sub\">{}</p>", escape(&extra));
        }
    }

    if let Some(history) = &data.history {
        if let Some(days) = history.orgs.iter().find(|o| o.id == org.id) {
            history_table(h, days, &history.time_zone);
        }
    }
    h.push_str("</section>");
}

/// A bar of `used` against `of`. `data-color` and the fill's class say the colour.
fn bar(
    h: &mut String,
    kind: &str,
    integration: Option<(&str, u64)>,
    label: &str,
    used: u64,
    of: u64,
    figures: &str,
) {
    let percent = if of == 0 {
        0.0
    } else {
        used as f64 * 100.0 / of as f64
    };
    let color = color_name(Level::of(percent));
    let width = percent.clamp(0.0, 100.0);
    // Floored, as the figure shown and `/api/v1/usage`: rounded, 79.96 % reads 80.0 on a
    // green bar.
    let shown = (percent * 10.0).floor() / 10.0;
    let attrs = integration
        .map(|(id, depth)| {
            format!(
                " data-integration=\"{}\" data-queue-depth=\"{depth}\"",
                escape(id)
            )
        })
        .unwrap_or_default();
    let _ = write!(
        h,
        "<div class=\"meter {kind}\" data-bar=\"{kind}\"{attrs} data-color=\"{color}\" data-percent=\"{shown:.1}\">\
         <div class=\"label\"><span class=\"name\">{}</span><span class=\"num\">{} · <b class=\"{color}\">{}%</b></span></div>\
         <div class=\"track\" role=\"progressbar\" aria-label=\"{}\" aria-valuemin=\"0\" aria-valuemax=\"100\" aria-valuenow=\"{width:.0}\">\
         <div class=\"fill {color}\" style=\"width:{width:.1}%\"></div></div></div>",
        escape(label),
        escape(figures),
        percent.floor(),
        escape(label),
    );
}

fn unknown_bar(h: &mut String, kind: &str, label: &str, figures: &str) {
    let _ = write!(
        h,
        "<div class=\"meter {kind}\" data-bar=\"{kind}\" data-color=\"none\">\
         <div class=\"label\"><span class=\"name\">{}</span><span class=\"num\">{}</span></div>\
         <div class=\"track\"><div class=\"fill none\" style=\"width:0%\"></div></div></div>",
        escape(label),
        escape(figures)
    );
}

fn history_table(h: &mut String, org: &crate::history::OrgHistory, zone: &str) {
    if org.days.is_empty() {
        return;
    }
    let _ = write!(
        h,
        "<h3>Last {} days</h3><p class=\"meta\">Counted calls per calendar day ({}).</p>\
         <div class=\"scroll\"><table class=\"history\"><thead><tr><th>Integration</th>",
        org.days.len(),
        escape(zone)
    );
    // Newest first: on a phone the table scrolls sideways, and today matters most.
    for (n, d) in org.days.iter().rev().enumerate() {
        // MM-DD is enough for a week.
        let label = if n == 0 {
            "Today"
        } else {
            d.day.get(5..).unwrap_or(&d.day)
        };
        let _ = write!(h, "<th title=\"{}\">{}</th>", escape(&d.day), escape(label));
    }
    h.push_str("</tr></thead><tbody>");
    // Every integration of any day, not only of the first: one removed from the config has
    // calls only on some days, and its row keeps the rows adding up to "All".
    let ids: BTreeSet<&String> = org
        .days
        .iter()
        .flat_map(|d| d.integrations.keys())
        .collect();
    for id in ids {
        let _ = write!(h, "<tr><th scope=\"row\">{}</th>", escape(id));
        for d in org.days.iter().rev() {
            let n = d.integrations.get(id).copied().unwrap_or(0);
            let _ = write!(h, "<td>{}</td>", thousands(n));
        }
        h.push_str("</tr>");
    }
    h.push_str("<tr class=\"total\"><th scope=\"row\">All</th>");
    for d in org.days.iter().rev() {
        let _ = write!(h, "<td>{}</td>", thousands(d.total));
    }
    h.push_str("</tr></tbody></table></div>");
}

/// The threshold form: outside the live part, so a refresh never clears what is typed.
fn form(h: &mut String, data: &PageData<'_>) {
    h.push_str(
        "<section class=\"card\" id=\"threshold\"><h2>Change the threshold</h2>\
         <form id=\"threshold-form\" novalidate><label>Org <select name=\"org\">",
    );
    for org in &data.usage.orgs {
        let (t, _) = data.thresholds.get(&org.id).unwrap_or((None, Source::None));
        let (levels, notify, interval) = match &t {
            Some(t) => {
                let json = notify::to_json(t);
                let levels: Vec<String> = t.levels.iter().map(|l| l.to_string()).collect();
                (
                    levels.join(", "),
                    t.notify.join(", "),
                    json["min_interval"].as_str().unwrap_or("4h").to_owned(),
                )
            }
            None => (String::new(), String::new(), "4h".to_owned()),
        };
        let _ = write!(
            h,
            "<option value=\"{0}\" data-levels=\"{1}\" data-notify=\"{2}\" data-min-interval=\"{3}\">{0}</option>",
            escape(&org.id),
            escape(&levels),
            escape(&notify),
            escape(&interval)
        );
    }
    h.push_str(
        "</select></label>\
         <label>Levels <input name=\"levels\" inputmode=\"text\" placeholder=\"80%, 90%, 100%\" autocomplete=\"off\">\
         <small>Percentages of the daily limit, or numbers of calls. Integrations with a quota are told at the same percentages of their quota.</small></label>\
         <label>Email to <input name=\"notify\" type=\"text\" placeholder=\"admin@example.com, ops@example.com\" autocomplete=\"off\"></label>\
         <label>At most one email per <input name=\"min_interval\" placeholder=\"4h\" autocomplete=\"off\">\
         <small>A higher level is told at once.</small></label>",
    );
    if data.token_set {
        h.push_str(
            "<label>Admin token <input name=\"token\" type=\"password\" autocomplete=\"current-password\"></label>\
             <div class=\"buttons\"><button type=\"submit\">Save</button>\
             <button type=\"button\" id=\"threshold-reset\" class=\"secondary\">Back to the config file</button></div>",
        );
    } else {
        let _ = write!(
            h,
            "<p class=\"note\">Changes are turned off: no admin token is set. Export one in {} and restart callmeter.</p>",
            escape(data.token_env)
        );
    }
    h.push_str("<p id=\"form-result\" role=\"status\"></p></form></section>");
}

fn window_text(minutes: u32) -> String {
    if minutes % 60 == 0 {
        format!("{} hours", minutes / 60)
    } else {
        format!("{minutes} minutes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{DayCount, OrgHistory};

    fn day(day: &str, rows: &[(&str, u64)]) -> DayCount {
        DayCount {
            day: day.to_owned(),
            total: rows.iter().map(|r| r.1).sum(),
            integrations: rows.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        }
    }

    /// A bar just under 80 % is green and says so in every figure it carries.
    #[test]
    fn a_bar_just_under_a_colour_step_reads_below_it() {
        let mut h = String::new();
        bar(&mut h, "org", None, "acme", 7_996, 10_000, "7,996 / 10,000");
        assert!(h.contains(r#"data-color="green""#), "{h}");
        assert!(h.contains(r#"data-percent="79.9""#), "{h}");
        assert!(h.contains(">79%<"), "{h}");
    }

    /// An integration removed from the config (then a restart) has calls only on the days it
    /// made them; its row is there all the same, so the rows add up to "All". (The table took
    /// its rows from the oldest day, where it had none.)
    #[test]
    fn history_rows_add_up_to_the_all_row() {
        let org = OrgHistory {
            id: "acme".into(),
            days: vec![
                day("2026-12-01", &[("etl", 5)]),
                day("2026-12-02", &[("etl", 5), ("old-sync", 700)]),
                day("2026-12-03", &[("etl", 2)]),
            ],
        };
        let mut h = String::new();
        history_table(&mut h, &org, "UTC");
        assert!(
            h.contains("<td>705</td>"),
            "the All row has 705 on 12-02: {h}"
        );
        assert!(
            h.contains(">old-sync</th>"),
            "700 of the 705 calls of 12-02 belong to no row: {h}"
        );
    }
}
