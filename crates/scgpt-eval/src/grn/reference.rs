//! A reference regulatory network: a TSV of `regulator  target  [sign or weight]`.
//!
//! Format: one edge per line, fields separated by tabs (or by spaces when a line has no tab);
//! blank lines and lines starting with `#` are comments. The third column is optional: a number
//! (a weight), `+`/`-`, or `activation`/`activator`/`repression`/`repressor`/`unknown`/`?`; it is
//! kept but not used by the scoring, which is unsigned. A header is optional: the first
//! non-comment line is one when its first field is a usual column name (`regulator`, `tf`,
//! `source`, `from`, `gene1`, `regulator_gene`, `tf_name`, case-insensitive) or its third field
//! is not a sign or weight. A repeated (regulator, target) pair counts once (the first is kept).

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use anyhow::{bail, Context, Result};

const HEADER_NAMES: [&str; 7] = ["regulator", "tf", "source", "from", "gene1", "regulator_gene", "tf_name"];

#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceEdge {
    pub regulator: String,
    pub target: String,
    /// The third column: a weight, or +1 / −1 for a sign; None when absent or unknown.
    pub sign_or_weight: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceNetwork {
    /// Where it came from, for messages.
    pub source: String,
    pub edges: Vec<ReferenceEdge>,
    pub had_header: bool,
    /// Repeated pairs dropped.
    pub duplicates: usize,
}

/// The third column's value: Ok(Some) for a weight or sign, Ok(None) for "unknown", Err for
/// anything else.
fn sign_or_weight(field: &str) -> std::result::Result<Option<f64>, ()> {
    match field.to_ascii_lowercase().as_str() {
        "+" | "activation" | "activator" => Ok(Some(1.0)),
        "-" | "repression" | "repressor" => Ok(Some(-1.0)),
        "unknown" | "?" | "" => Ok(None),
        other => other.parse::<f64>().ok().filter(|v| v.is_finite()).map(Some).ok_or(()),
    }
}

impl ReferenceNetwork {
    /// Parses the text of a reference network; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let mut edges = Vec::new();
        let mut seen = HashSet::new();
        let (mut had_header, mut first, mut duplicates) = (false, true, 0);
        for (no, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let fields: Vec<&str> =
                if line.contains('\t') { line.split('\t').map(str::trim).collect() } else { line.split_whitespace().collect() };
            let is_first = std::mem::replace(&mut first, false);
            if is_first
                && (HEADER_NAMES.contains(&fields[0].to_ascii_lowercase().as_str())
                    || (fields.len() == 3 && sign_or_weight(fields[2]).is_err()))
            {
                had_header = true;
                continue;
            }
            if !(2..=3).contains(&fields.len()) {
                bail!(
                    "{source}, line {}: {} fields; a reference edge is `regulator<TAB>target[<TAB>sign or weight]`",
                    no + 1,
                    fields.len()
                );
            }
            if fields[0].is_empty() || fields[1].is_empty() {
                bail!("{source}, line {}: an empty regulator or target name", no + 1);
            }
            let w = match fields.get(2) {
                None => None,
                Some(f) => sign_or_weight(f).map_err(|()| {
                    anyhow::anyhow!(
                        "{source}, line {}: the third column `{f}` is neither a number nor a sign (+, -, activation, repression, unknown)",
                        no + 1
                    )
                })?,
            };
            if !seen.insert((fields[0].to_string(), fields[1].to_string())) {
                duplicates += 1;
                continue;
            }
            edges.push(ReferenceEdge { regulator: fields[0].into(), target: fields[1].into(), sign_or_weight: w });
        }
        if edges.is_empty() {
            bail!("{source}: no edge found (expected lines `regulator<TAB>target[<TAB>sign or weight]`)");
        }
        Ok(ReferenceNetwork { source: source.to_string(), edges, had_header, duplicates })
    }

    /// Reads and parses a reference network file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading the reference network {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn regulators(&self) -> BTreeSet<&str> {
        self.edges.iter().map(|e| e.regulator.as_str()).collect()
    }
    pub fn targets(&self) -> BTreeSet<&str> {
        self.edges.iter().map(|e| e.target.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers_signs_and_duplicates() {
        let n = ReferenceNetwork::parse("# c\nTF\tTarget\tMode\nA\tB\t+\nA\tC\t-0.5\nA\tB\t-\n\nD A unknown\n", "r.tsv").unwrap();
        assert!(n.had_header);
        assert_eq!(n.duplicates, 1);
        assert_eq!(n.edges.len(), 3);
        assert_eq!(n.edges[1].sign_or_weight, Some(-0.5));
        assert_eq!(n.edges[2], ReferenceEdge { regulator: "D".into(), target: "A".into(), sign_or_weight: None });
        assert_eq!(n.regulators().into_iter().collect::<Vec<_>>(), vec!["A", "D"]);
        let plain = ReferenceNetwork::parse("A\tB\nC\tD\n", "p.tsv").unwrap();
        assert!(!plain.had_header && plain.edges.len() == 2);
        let e = ReferenceNetwork::parse("A\tB\nA\tB\tC\tD\n", "x.tsv").unwrap_err().to_string();
        assert!(e.contains("x.tsv, line 2"), "{e}");
        assert!(ReferenceNetwork::parse("A\tB\tmaybe\nC\tD\tstrong\n", "x.tsv").unwrap_err().to_string().contains("line 2"));
        assert!(ReferenceNetwork::parse("regulator\ttarget\n", "x.tsv").is_err());
        assert!(ReferenceNetwork::parse("A\t\n", "x.tsv").is_err());
        assert!(ReferenceNetwork::read(Path::new("/nonexistent/ref.tsv")).is_err());
    }
}
