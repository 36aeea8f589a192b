//! Layered configuration shared by every scgpt binary.
//!
//! Order of precedence, lowest first: the embedded defaults of the binary, the TOML file given
//! with `--config`, `SCGPT__SECTION__KEY=value` environment variables, and `--set section.key=value`
//! flags. The merged tree is deserialised into the binary's config struct; structs use
//! `#[serde(deny_unknown_fields)]`, so an unknown key or a wrong type becomes an error that names
//! the key and where its value came from.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::Value;

/// Where a configuration value came from, so errors can point the user at the right place.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Defaults,
    File(PathBuf),
    Env(String),
    SetFlag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Defaults => write!(f, "the built-in defaults"),
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::SetFlag(s) => write!(f, "--set {s}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("bad override `{text}` from {origin}: {why}")]
    Override { text: String, origin: Origin, why: String },
    #[error("config key `{key}` (from {origin}): {message}")]
    Invalid { key: String, origin: Origin, message: String },
}

/// A TOML tree being assembled from several layers, remembering the origin of every leaf.
#[derive(Debug, Clone)]
pub struct Layered {
    root: toml::Table,
    origins: BTreeMap<String, Origin>,
    /// The most specific file layer, used when a key has no recorded origin (e.g. a missing key).
    main_origin: Origin,
}

impl Default for Layered {
    fn default() -> Self {
        Self { root: toml::Table::new(), origins: BTreeMap::new(), main_origin: Origin::Defaults }
    }
}

impl Layered {
    pub fn new() -> Self {
        Self::default()
    }

    /// Merge a TOML document given as text (embedded defaults).
    pub fn with_toml_str(mut self, text: &str, origin: Origin) -> Result<Self, ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: PathBuf::from(origin.to_string()),
            message: e.message().to_string(),
        })?;
        self.merge_table(table, &origin);
        if matches!(origin, Origin::File(_)) {
            self.main_origin = origin;
        }
        Ok(self)
    }

    /// Merge a TOML file.
    pub fn with_file(self, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let table: toml::Table =
            text.parse().map_err(|e: toml::de::Error| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        let mut me = self;
        let origin = Origin::File(path.to_path_buf());
        me.merge_table(table, &origin);
        me.main_origin = origin;
        Ok(me)
    }

    /// Merge `PREFIX__SECTION__KEY=value` variables from the given iterator (use `std::env::vars()`).
    pub fn with_env<I>(mut self, prefix: &str, vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let head = format!("{prefix}__");
        let mut vars: Vec<(String, String)> = vars.into_iter().filter(|(k, _)| k.starts_with(&head)).collect();
        vars.sort();
        for (name, raw) in vars {
            let path: Vec<String> = name[head.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect();
            let origin = Origin::Env(name.clone());
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Override {
                    text: format!("{name}={raw}"),
                    origin,
                    why: "expected SCGPT__SECTION__KEY with non-empty parts".into(),
                });
            }
            self.set_path(&path, parse_scalar(&raw), origin)?;
        }
        Ok(self)
    }

    /// Merge `section.key=value` overrides (the `--set` flag).
    pub fn with_sets<S: AsRef<str>>(mut self, sets: &[S]) -> Result<Self, ConfigError> {
        for s in sets {
            let s = s.as_ref();
            let origin = Origin::SetFlag(s.to_string());
            let Some((key, raw)) = s.split_once('=') else {
                return Err(ConfigError::Override { text: s.into(), origin, why: "expected section.key=value".into() });
            };
            let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
            if path.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Override { text: s.into(), origin, why: "empty key part; expected section.key=value".into() });
            }
            self.set_path(&path, parse_scalar(raw.trim()), origin)?;
        }
        Ok(self)
    }

    /// The merged tree, for writing the resolved config next to a run's outputs.
    pub fn table(&self) -> &toml::Table {
        &self.root
    }

    /// Deserialise into `T`; errors name the offending key and the layer it came from.
    pub fn build<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let value = Value::Table(self.root.clone());
        serde_path_to_error::deserialize::<_, T>(value).map_err(|err| {
            let key = err.path().to_string();
            let inner = err.into_inner();
            let message = inner.to_string();
            // For unknown fields serde's path may stop at the parent (then the field name is
            // appended) or already end with the field (then it is complete as it is).
            let key = match unknown_field_name(&message) {
                Some(field) if key == "." || key.is_empty() => field,
                Some(field) if key == field || key.ends_with(&format!(".{field}")) => key,
                Some(field) => format!("{key}.{field}"),
                None => key,
            };
            let origin = self.origin_of(&key);
            ConfigError::Invalid { key, origin, message }
        })
    }

    fn origin_of(&self, key: &str) -> Origin {
        let mut k = key.to_string();
        loop {
            if let Some(o) = self.origins.get(&k) {
                return o.clone();
            }
            match k.rfind('.') {
                Some(i) => k.truncate(i),
                None => return self.main_origin.clone(),
            }
        }
    }

    fn merge_table(&mut self, table: toml::Table, origin: &Origin) {
        fn walk(dst: &mut toml::Table, src: toml::Table, prefix: &str, origin: &Origin, origins: &mut BTreeMap<String, Origin>) {
            for (k, v) in src {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match (dst.get_mut(&k), v) {
                    (Some(Value::Table(d)), Value::Table(s)) => walk(d, s, &path, origin, origins),
                    (_, Value::Table(s)) => {
                        let mut fresh = toml::Table::new();
                        walk(&mut fresh, s, &path, origin, origins);
                        dst.insert(k, Value::Table(fresh));
                    }
                    (_, v) => {
                        origins.insert(path, origin.clone());
                        dst.insert(k, v);
                    }
                }
            }
        }
        walk(&mut self.root, table, "", origin, &mut self.origins);
    }

    fn set_path(&mut self, path: &[String], value: Value, origin: Origin) -> Result<(), ConfigError> {
        let mut cur = &mut self.root;
        for (i, part) in path[..path.len() - 1].iter().enumerate() {
            let entry = cur.entry(part.clone()).or_insert_with(|| Value::Table(toml::Table::new()));
            cur = match entry {
                Value::Table(t) => t,
                _ => {
                    return Err(ConfigError::Override {
                        text: path.join("."),
                        origin,
                        why: format!("`{}` is a value, not a section", path[..=i].join(".")),
                    })
                }
            };
        }
        cur.insert(path[path.len() - 1].clone(), value);
        self.origins.insert(path.join("."), origin);
        Ok(())
    }
}

/// Parse an override value as a TOML literal (number, bool, array, quoted string); anything that
/// is not valid TOML is taken as a bare string, so `--set run.dir=runs/a` works without quotes.
pub fn parse_scalar(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| Value::String(raw.to_string())),
        Err(_) => Value::String(raw.to_string()),
    }
}

fn unknown_field_name(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Train {
        lr: f64,
        #[serde(default)]
        epochs: u32,
    }
    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        train: Train,
        #[serde(default)]
        name: String,
    }

    fn file_with(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exp.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn layers_apply_in_order() {
        let (_d, p) = file_with("[train]\nlr = 0.1\nepochs = 2\n");
        let cfg: Cfg = Layered::new()
            .with_toml_str("name = \"base\"\n[train]\nlr = 1.0\n", Origin::Defaults)
            .unwrap()
            .with_file(&p)
            .unwrap()
            .with_env("SCGPT", vec![("SCGPT__TRAIN__EPOCHS".to_string(), "5".to_string())])
            .unwrap()
            .with_sets(&["train.lr=0.001", "name=run-a"])
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(cfg, Cfg { train: Train { lr: 0.001, epochs: 5 }, name: "run-a".into() });
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let (_d, p) = file_with("[train]\nlr = 0.1\nlearning_rate = 3\n");
        let err = Layered::new().with_file(&p).unwrap().build::<Cfg>().unwrap_err().to_string();
        assert!(err.contains("train.learning_rate"), "{err}");
        assert!(!err.contains("learning_rate.learning_rate"), "the field is named once: {err}");
        assert!(err.contains("exp.toml"), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_origin() {
        let (_d, p) = file_with("[train]\nlr = 0.1\n");
        let err =
            Layered::new().with_file(&p).unwrap().with_sets(&["train.epochs=\"many\""]).unwrap().build::<Cfg>().unwrap_err().to_string();
        assert!(err.contains("train.epochs"), "{err}");
        assert!(err.contains("--set train.epochs"), "{err}");
        let err = Layered::new()
            .with_file(&p)
            .unwrap()
            .with_env("SCGPT", vec![("SCGPT__TRAIN__LR".into(), "fast".into())])
            .unwrap()
            .build::<Cfg>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("train.lr") && err.contains("SCGPT__TRAIN__LR"), "{err}");
    }

    #[test]
    fn bad_toml_names_file() {
        let (_d, p) = file_with("[train\nlr = 0.1\n");
        let err = Layered::new().with_file(&p).unwrap_err().to_string();
        assert!(err.contains("exp.toml"), "{err}");
    }

    #[test]
    fn scalars_parse_as_toml_or_string() {
        assert_eq!(parse_scalar("3"), Value::Integer(3));
        assert_eq!(parse_scalar("true"), Value::Boolean(true));
        assert_eq!(parse_scalar("runs/a"), Value::String("runs/a".into()));
        assert_eq!(parse_scalar("[1, 2]"), Value::Array(vec![Value::Integer(1), Value::Integer(2)]));
    }
}
