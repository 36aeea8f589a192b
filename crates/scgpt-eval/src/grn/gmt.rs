//! Gene sets: the GMT format (one set per line: name, description, then the genes, tab
//! separated), and named lists made elsewhere (gene programs).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// A named list of genes (each gene once, in first-appearance order).
#[derive(Debug, Clone, PartialEq)]
pub struct GeneSet {
    pub name: String,
    pub description: String,
    pub genes: Vec<String>,
}

impl GeneSet {
    /// A set from `genes`, repeated names dropped.
    pub fn new(name: impl Into<String>, description: impl Into<String>, genes: impl IntoIterator<Item = String>) -> Self {
        let mut seen = HashSet::new();
        let genes = genes.into_iter().filter(|g| seen.insert(g.clone())).collect();
        GeneSet { name: name.into(), description: description.into(), genes }
    }
}

/// Parses GMT text. `what` names the source in errors (a path, say). Blank lines and lines
/// starting with `#` are skipped; empty gene fields (trailing tabs) are ignored, and a gene
/// repeated within a set counts once. A line without a tab, or with an empty name, is an error
/// naming the line; so is a file with no set.
pub fn parse_gmt(text: &str, what: &str) -> Result<Vec<GeneSet>> {
    let mut sets = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split('\t');
        let name = fields.next().unwrap_or("").trim();
        let Some(description) = fields.next() else {
            bail!("{what}, line {}: a GMT line needs tab-separated fields (name, description, genes...); found no tab", no + 1);
        };
        if name.is_empty() {
            bail!("{what}, line {}: the gene set has an empty name", no + 1);
        }
        let genes = fields.map(|g| g.trim()).filter(|g| !g.is_empty()).map(String::from);
        sets.push(GeneSet::new(name, description.trim(), genes));
    }
    if sets.is_empty() {
        bail!("{what}: no gene set found (GMT: one set per line, name<TAB>description<TAB>gene<TAB>gene...)");
    }
    Ok(sets)
}

/// Reads and parses a GMT file.
pub fn read_gmt(path: &Path) -> Result<Vec<GeneSet>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the gene-set file {}", path.display()))?;
    parse_gmt(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let s = parse_gmt("# c\nSET1\tdesc one\tA\tB\tA\t\n\nSET2\t\r\nSET3\thttp://x\tC\r\n", "t.gmt").unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], GeneSet { name: "SET1".into(), description: "desc one".into(), genes: vec!["A".into(), "B".into()] });
        assert!(s[1].genes.is_empty());
        assert_eq!(s[2].genes, vec!["C".to_string()]);
        let e = parse_gmt("a\tb\nnotabs here\n", "x.gmt").unwrap_err().to_string();
        assert!(e.contains("x.gmt, line 2"), "{e}");
        assert!(parse_gmt("\tdesc\tA\n", "x.gmt").is_err());
        assert!(parse_gmt("# only a comment\n", "x.gmt").is_err());
        assert!(read_gmt(Path::new("/nonexistent/sets.gmt")).unwrap_err().to_string().contains("/nonexistent/sets.gmt"));
    }
}
