//! Perturbation conditions as GEARS writes them: `ctrl`, `GENE+ctrl` (or `ctrl+GENE`) and
//! `GENE1+GENE2`.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The control label and the separator between the two parts of a condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConditionFormat {
    pub control: String,
    pub separator: String,
}

impl Default for ConditionFormat {
    fn default() -> Self {
        ConditionFormat { control: "ctrl".into(), separator: "+".into() }
    }
}

/// One parsed condition. A double keeps the order its string gave.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Condition {
    Control,
    Single(String),
    Double(String, String),
}

impl ConditionFormat {
    pub fn parse(&self, s: &str) -> Result<Condition> {
        if self.control.is_empty() || self.separator.is_empty() {
            bail!("the condition format needs a non-empty control label and separator");
        }
        let ctrl = self.control.as_str();
        if s == ctrl {
            return Ok(Condition::Control);
        }
        let parts: Vec<&str> = s.split(self.separator.as_str()).collect();
        let bad_part = parts.iter().any(|p| p.is_empty() || p.trim() != *p);
        match parts.as_slice() {
            [a, b] if !bad_part => match (*a == ctrl, *b == ctrl) {
                (false, true) => Ok(Condition::Single(a.to_string())),
                (true, false) => Ok(Condition::Single(b.to_string())),
                (false, false) => Ok(Condition::Double(a.to_string(), b.to_string())),
                (true, true) => bail!("{}", self.expected(s, "both parts are the control label")),
            },
            _ => bail!("{}", self.expected(s, "it does not have one of these forms")),
        }
    }

    fn expected(&self, s: &str, why: &str) -> String {
        let (c, p) = (&self.control, &self.separator);
        format!(
            "condition {s:?} cannot be read: {why}; expected {c:?}, \"GENE{p}{c}\", \"{c}{p}GENE\" or \
             \"GENE1{p}GENE2\" (gene names without spaces; control label {c:?}, separator {p:?})"
        )
    }

    /// GEARS's canonical string: `ctrl`, `G+ctrl`, and a double in its own order.
    pub fn to_gears_string(&self, c: &Condition) -> String {
        let (ctrl, sep) = (&self.control, &self.separator);
        match c {
            Condition::Control => ctrl.clone(),
            Condition::Single(g) => format!("{g}{sep}{ctrl}"),
            Condition::Double(a, b) => format!("{a}{sep}{b}"),
        }
    }
}

impl Condition {
    /// Parses with the default format (`ctrl`, `+`).
    pub fn parse(s: &str) -> Result<Condition> {
        ConditionFormat::default().parse(s)
    }

    /// The perturbed genes, in the string's order.
    pub fn genes(&self) -> Vec<&str> {
        match self {
            Condition::Control => Vec::new(),
            Condition::Single(g) => vec![g.as_str()],
            Condition::Double(a, b) => vec![a.as_str(), b.as_str()],
        }
    }

    /// The canonical string in the default format.
    pub fn to_gears_string(&self) -> String {
        ConditionFormat::default().to_gears_string(self)
    }

    pub fn is_control(&self) -> bool {
        matches!(self, Condition::Control)
    }
}

/// Cells grouped by their condition string: the groups in order of first appearance (GEARS's
/// `obs["condition"].unique()` order), each cell's group, and the control group.
#[derive(Debug, Clone)]
pub struct CellGroups {
    pub names: Vec<String>,
    pub conditions: Vec<Condition>,
    pub cell_group: Vec<usize>,
    pub control: usize,
}

impl CellGroups {
    /// Every string must parse, and one group must be the control.
    pub fn new(cell_conditions: &[impl AsRef<str>], format: &ConditionFormat) -> Result<CellGroups> {
        let mut index = std::collections::HashMap::new();
        let (mut names, mut conditions, mut cell_group) = (Vec::new(), Vec::new(), Vec::with_capacity(cell_conditions.len()));
        for (i, c) in cell_conditions.iter().enumerate() {
            let s = c.as_ref();
            let k = match index.get(s) {
                Some(&k) => k,
                None => {
                    let cond = format.parse(s).map_err(|e| anyhow::anyhow!("cell {i}: {e}"))?;
                    index.insert(s.to_string(), names.len());
                    names.push(s.to_string());
                    conditions.push(cond);
                    names.len() - 1
                }
            };
            cell_group.push(k);
        }
        let Some(control) = conditions.iter().position(Condition::is_control) else {
            bail!(
                "no cell has the control condition {:?} ({} conditions seen); the metrics and DE genes need control cells \
                 (set the control label if the screen calls it something else)",
                format.control,
                names.len()
            );
        };
        Ok(CellGroups { names, conditions, cell_group, control })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_gears_form() {
        assert_eq!(Condition::parse("ctrl").unwrap(), Condition::Control);
        assert_eq!(Condition::parse("KLF1+ctrl").unwrap(), Condition::Single("KLF1".into()));
        assert_eq!(Condition::parse("ctrl+KLF1").unwrap(), Condition::Single("KLF1".into()));
        let d = Condition::parse("MAP2K6+KLF1").unwrap();
        assert_eq!(d, Condition::Double("MAP2K6".into(), "KLF1".into()));
        assert_eq!(d.genes(), ["MAP2K6", "KLF1"]);
        assert_eq!(d.to_gears_string(), "MAP2K6+KLF1");
        assert_eq!(Condition::parse("ctrl+KLF1").unwrap().to_gears_string(), "KLF1+ctrl");
        assert_eq!(Condition::Control.to_gears_string(), "ctrl");
    }

    #[test]
    fn custom_label_and_separator() {
        let f = ConditionFormat { control: "NT".into(), separator: "_".into() };
        assert_eq!(f.parse("NT_A").unwrap(), Condition::Single("A".into()));
        assert_eq!(f.parse("A_B").unwrap(), Condition::Double("A".into(), "B".into()));
        assert_eq!(f.to_gears_string(&Condition::Single("A".into())), "A_NT");
        assert!(f.parse("A+ctrl").is_err());
    }

    #[test]
    fn cells_are_grouped_in_order_of_first_appearance() {
        let g = CellGroups::new(&["B+ctrl", "ctrl", "B+ctrl", "A+B"], &ConditionFormat::default()).unwrap();
        assert_eq!(g.names, ["B+ctrl", "ctrl", "A+B"]);
        assert_eq!(g.cell_group, [0, 1, 0, 2]);
        assert_eq!(g.control, 1);
        let e = CellGroups::new(&["B+ctrl"], &ConditionFormat::default()).unwrap_err().to_string();
        assert!(e.contains("no cell has the control condition \"ctrl\""), "{e}");
    }

    #[test]
    fn malformed_strings_name_the_string_and_the_forms() {
        for bad in ["", "A", "A+B+C", "+A", "A+", "ctrl+ctrl", "A +B", "KLF1+ctrl "] {
            let e = Condition::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("GENE1+GENE2"), "{e}");
        }
    }
}
