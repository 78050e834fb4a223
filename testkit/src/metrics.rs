//! Reading a Prometheus text exposition (what `/metrics` returns) in assertions.
//!
//! [`metric`] fails when the sample is missing, so a renamed or unregistered metric can never
//! pass an `== 0` check. Prometheus client libraries omit a labelled series until it is first
//! incremented; only where that absence truly means zero does a test use [`metric_or_zero`].

/// A sample as written in an exposition: the metric name and its labels, sorted by name (so
/// `x{b="2",a="1"}` and `x{a="1",b="2"}` are the same sample).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct SampleKey {
    name: String,
    labels: Vec<(String, String)>,
}

impl SampleKey {
    /// Parses `name` or `name{label="value",...}`; `None` when it is neither.
    fn parse(text: &str) -> Option<SampleKey> {
        let text = text.trim();
        let (name, labels) = match text.split_once('{') {
            None => (text, Vec::new()),
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        };
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        valid_name.then(|| {
            let mut labels = labels;
            labels.sort();
            SampleKey { name: name.to_owned(), labels }
        })
    }

    /// The metric family: a histogram's `_bucket`, `_sum` and `_count` series belong to their
    /// histogram's name (a `_count` or `_sum` of a counter stays whole: close enough for hints).
    fn family(&self) -> &str {
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| self.name.strip_suffix(suffix)).unwrap_or(&self.name)
    }
}

impl std::fmt::Display for SampleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            write!(f, "{{{}}}", labels.join(","))?;
        }
        Ok(())
    }
}

/// `a="1",b="x y"` (escapes kept as written); `None` when malformed.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end?;
        labels.push((name.trim().to_owned(), after[..end].to_owned()));
        rest = after[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(labels)
}

/// Splits a sample line into its key text and value text (a trailing timestamp is ignored).
fn split_line(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let key_end = match line.find(['{', ' ', '\t']) {
        Some(open) if line[open..].starts_with('{') => {
            // The closing brace outside quoted label values.
            let (mut quoted, mut escaped) = (false, false);
            let close = line[open..].char_indices().find_map(|(i, c)| {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    '}' if !quoted => return Some(open + i + 1),
                    _ => {}
                }
                None
            })?;
            close
        }
        Some(space) => space,
        None => return None,
    };
    let (key, rest) = line.split_at(key_end);
    Some((key, rest.split_whitespace().next()?))
}

/// Every sample of an exposition with its value, in order; comment and malformed lines skipped.
fn samples(text: &str) -> Vec<(SampleKey, f64)> {
    text.lines()
        .filter_map(split_line)
        .filter_map(|(key, value)| Some((SampleKey::parse(key)?, value.parse::<f64>().ok()?)))
        .collect()
}

/// The value of `sample` (`name` or `name{label="value",...}`, labels in any order) in the
/// exposition `text`.
///
/// Panics when the sample is absent, naming it and listing the samples of the same metric and
/// the similarly named metrics that are present: a renamed metric, a changed label or a series
/// that was never incremented fails here instead of reading as 0. See [`metric_or_zero`] for the
/// few places where absence means zero.
#[track_caller]
pub fn metric(text: &str, sample: &str) -> f64 {
    let wanted = parse_sample(sample);
    let all = samples(text);
    if let Some(value) = all.iter().find_map(|(key, value)| (*key == wanted).then_some(*value)) {
        return value;
    }
    panic!("{}", absent_message(&wanted, &all));
}

/// As [`metric`], but 0 when `sample` is absent.
///
/// Only for a labelled series whose absence truly means zero: Prometheus client libraries
/// export a labelled series only once it has been incremented, so "no slow consumer yet" or
/// "no duplicate at all" is a missing line, not a 0. Prefer [`metric`] (and an assertion on a
/// series that must exist) everywhere else. Still panics when `text` holds no sample at all (an
/// error page is not an exposition) or `sample` is not a sample name.
#[track_caller]
pub fn metric_or_zero(text: &str, sample: &str) -> f64 {
    let wanted = parse_sample(sample);
    let all = samples(text);
    assert!(!all.is_empty(), "not a metrics exposition (no sample in it) while looking for `{wanted}`:\n{text}");
    all.iter().find_map(|(key, value)| (*key == wanted).then_some(*value)).unwrap_or(0.0)
}

#[track_caller]
fn parse_sample(sample: &str) -> SampleKey {
    SampleKey::parse(sample)
        .unwrap_or_else(|| panic!("`{sample}` is not a sample name (`name` or `name{{label=\"value\",...}}`)"))
}

/// Why `wanted` is not there, with what is.
fn absent_message(wanted: &SampleKey, all: &[(SampleKey, f64)]) -> String {
    let mut message = format!("metric sample `{wanted}` is not in the exposition");
    if all.is_empty() {
        message.push_str(" (it holds no sample at all: is it a metrics page?)");
        return message;
    }
    let same_name: Vec<String> =
        all.iter().filter(|(key, _)| key.name == wanted.name).map(|(key, value)| format!("{key} {value}")).collect();
    if !same_name.is_empty() {
        message.push_str(&format!(
            "; `{}` has only these series (a labelled series appears once it is first incremented):\n  {}",
            wanted.name,
            same_name.join("\n  ")
        ));
        return message;
    }
    let mut families: Vec<&str> = all.iter().map(|(key, _)| key.family()).collect();
    families.sort_unstable();
    families.dedup();
    let wanted_family = wanted.family();
    let mut similar: Vec<(usize, &str)> = families
        .iter()
        .map(|family| (distance(wanted_family, family), *family))
        .filter(|(d, family)| *d <= (wanted_family.len() / 3).max(3) || shares_a_word(wanted_family, family))
        .collect();
    similar.sort_unstable();
    let names: Vec<&str> = similar.iter().take(10).map(|(_, family)| *family).collect();
    if names.is_empty() {
        message.push_str(&format!(
            "; no similarly named metric either ({} metrics present, e.g. {})",
            families.len(),
            families.iter().take(5).copied().collect::<Vec<_>>().join(", ")
        ));
    } else {
        message.push_str(&format!(" (renamed?); similar metrics present: {}", names.join(", ")));
    }
    message
}

/// Whether two metric names share a distinctive word (not `chat`, `total`, `seconds`...).
fn shares_a_word(a: &str, b: &str) -> bool {
    const COMMON: &[&str] = &["chat", "total", "seconds", "bucket", "count", "sum", "bytes"];
    a.split('_').filter(|w| w.len() >= 4 && !COMMON.contains(w)).any(|w| b.split('_').any(|v| v == w))
}

/// Levenshtein distance (metric names are short).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous + usize::from(ca != *cb);
            previous = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP chat_connections Open WebSocket connections.
# TYPE chat_connections gauge
chat_connections 3
# HELP chat_sends_total Sends by outcome.
# TYPE chat_sends_total counter
chat_sends_total{outcome="acked"} 12
chat_sends_total{outcome="unavailable"} 1
chat_faults_injected_total{action="drop",hop="gateway.deliver"} 1
chat_gap_repairs_total 0
chat_send_ack_seconds_bucket{le="0.5"} 10
chat_send_ack_seconds_bucket{le="+Inf"} 12
chat_send_ack_seconds_sum 0.25
chat_send_ack_seconds_count 12
odd_metric{path="a b}c",x="q\"uote"} 7 1700000000000
"#;

    fn panic_message(f: impl FnOnce() -> f64 + std::panic::UnwindSafe) -> String {
        let error = std::panic::catch_unwind(f).expect_err("should panic");
        error.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    #[test]
    fn reads_present_samples() {
        assert_eq!(metric(TEXT, "chat_connections"), 3.0);
        assert_eq!(metric(TEXT, "chat_sends_total{outcome=\"acked\"}"), 12.0);
        assert_eq!(metric(TEXT, "chat_gap_repairs_total"), 0.0);
        assert_eq!(metric(TEXT, "chat_send_ack_seconds_bucket{le=\"+Inf\"}"), 12.0);
        assert_eq!(metric(TEXT, "chat_send_ack_seconds_sum"), 0.25);
        assert_eq!(metric(TEXT, "odd_metric{x=\"q\\\"uote\",path=\"a b}c\"}"), 7.0, "quoted braces, timestamp");
    }

    #[test]
    fn label_order_does_not_matter() {
        assert_eq!(metric(TEXT, "chat_faults_injected_total{hop=\"gateway.deliver\",action=\"drop\"}"), 1.0);
    }

    #[test]
    fn a_name_is_not_a_prefix() {
        // `chat_sends_total` alone is not a sample here (only labelled series exist).
        let message = panic_message(|| metric(TEXT, "chat_sends_total"));
        assert!(message.contains("chat_sends_total{outcome=\"acked\"} 12"), "{message}");
        let message = panic_message(|| metric(TEXT, "chat_connection"));
        assert!(message.contains("similar metrics present: chat_connections"), "{message}");
    }

    #[test]
    fn an_absent_labelled_series_names_the_present_ones() {
        let message = panic_message(|| metric(TEXT, "chat_sends_total{outcome=\"duplicate\"}"));
        assert!(message.contains("`chat_sends_total{outcome=\"duplicate\"}` is not in the exposition"), "{message}");
        assert!(message.contains("chat_sends_total{outcome=\"unavailable\"} 1"), "{message}");
    }

    #[test]
    fn a_renamed_metric_lists_similar_names() {
        let message = panic_message(|| metric(TEXT, "chat_gap_repair_total"));
        assert!(message.contains("similar metrics present: chat_gap_repairs_total"), "{message}");
        let message = panic_message(|| metric(TEXT, "chat_fault_injections_total{hop=\"x\"}"));
        assert!(message.contains("chat_faults_injected_total"), "{message}");
        let message = panic_message(|| metric(TEXT, "chat_ack_seconds_count"));
        assert!(message.contains("chat_send_ack_seconds"), "{message}");
    }

    #[test]
    fn metric_or_zero_reads_absence_as_zero_but_not_a_non_exposition() {
        assert_eq!(metric_or_zero(TEXT, "chat_sends_total{outcome=\"duplicate\"}"), 0.0);
        assert_eq!(metric_or_zero(TEXT, "chat_sends_total{outcome=\"acked\"}"), 12.0);
        let message = panic_message(|| metric_or_zero("Not Found", "chat_connections"));
        assert!(message.contains("not a metrics exposition"), "{message}");
    }

    #[test]
    fn a_malformed_sample_name_is_refused() {
        let message = panic_message(|| metric(TEXT, "chat_sends_total{outcome=acked}"));
        assert!(message.contains("is not a sample name"), "{message}");
    }
}
