//! obs filters from the config, as the original's corpus queries:
//! `disease == "normal"`, `suspension_type != "na"`, `tissue_general in ["blood", "lung"]`.

use anyhow::{bail, Context};

#[derive(Debug, Clone, PartialEq)]
pub struct ObsFilter {
    pub column: String,
    pub negate: bool,
    pub values: Vec<String>,
}

impl ObsFilter {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let t = text.trim();
        let bad = || format!("obs filter `{text}`: expected `col == \"v\"`, `col != \"v\"`, `col in [\"a\", \"b\"]` or `col not in [...]`");
        let (column, negate, rhs, is_list) = if let Some((c, r)) = t.split_once("==") {
            (c, false, r, false)
        } else if let Some((c, r)) = t.split_once("!=") {
            (c, true, r, false)
        } else if let Some((c, r)) = t.split_once(" not in ") {
            (c, true, r, true)
        } else if let Some((c, r)) = t.split_once(" in ") {
            (c, false, r, true)
        } else {
            bail!(bad());
        };
        let column = column.trim().to_string();
        if column.is_empty() || column.contains(char::is_whitespace) {
            bail!(bad());
        }
        let parsed: toml::Value = format!("v = {}", rhs.trim()).parse::<toml::Table>().with_context(bad)?.remove("v").with_context(bad)?;
        let values = match (is_list, parsed) {
            (false, toml::Value::String(s)) => vec![s],
            (true, toml::Value::Array(a)) => a
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    _ => Err(anyhow::anyhow!(bad())),
                })
                .collect::<anyhow::Result<_>>()?,
            _ => bail!(bad()),
        };
        Ok(ObsFilter { column, negate, values })
    }

    pub fn keeps(&self, value: &str) -> bool {
        self.values.iter().any(|v| v == value) != self.negate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_corpus_filters() {
        let f = ObsFilter::parse(r#"disease == "normal""#).unwrap();
        assert!(f.keeps("normal") && !f.keeps("COVID-19"));
        let f = ObsFilter::parse(r#"suspension_type != "na""#).unwrap();
        assert!(!f.keeps("na") && f.keeps("cell"));
        let f = ObsFilter::parse(r#"tissue_general in ["blood", "lung"]"#).unwrap();
        assert!(f.keeps("lung") && !f.keeps("brain"));
        let f = ObsFilter::parse(r#"tissue_general not in ["blood"]"#).unwrap();
        assert!(f.keeps("lung") && !f.keeps("blood"));
        assert!(ObsFilter::parse("disease normal").is_err());
        assert!(ObsFilter::parse(r#"disease == normal"#).is_err());
    }
}
