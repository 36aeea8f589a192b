//! Metric logging: TensorBoard event files and `metrics.jsonl` (rank 0 only), and the
//! per-interval accumulation of loss terms and throughput between log lines.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::tasks::{Norm, Term};
use crate::tensorboard::EventWriter;

/// Where rank 0 writes its numbers; other ranks hold a silent one.
pub struct MetricLog {
    tb: Option<EventWriter>,
    jsonl: Option<PathBuf>,
}

impl MetricLog {
    pub fn silent() -> Self {
        MetricLog { tb: None, jsonl: None }
    }

    /// TensorBoard in `run/tensorboard`; points past `step` from an earlier session are
    /// superseded (a resumed run after a crash).
    pub fn create(run: &Path, step: u64, config_text: &str) -> anyhow::Result<Self> {
        let mut w = EventWriter::create(&run.join("tensorboard"))?;
        w.session_start(step)?;
        w.text("config", step, &format!("```\n{config_text}\n```"))?;
        Ok(MetricLog { tb: Some(w), jsonl: Some(run.join("metrics.jsonl")) })
    }

    pub fn write(&mut self, step: u64, scalars: &[(String, f64)]) -> anyhow::Result<()> {
        if let Some(tb) = self.tb.as_mut() {
            let pairs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            tb.scalars(step, &pairs)?;
        }
        if let Some(path) = &self.jsonl {
            let mut line = serde_json::Map::new();
            line.insert("step".into(), step.into());
            for (k, v) in scalars {
                line.insert(k.clone(), serde_json::Value::from(*v));
            }
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            writeln!(f, "{}", serde_json::Value::Object(line))?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(tb) = self.tb.as_mut() {
            tb.flush()?;
        }
        Ok(())
    }
}

/// One optimiser step's loss terms as sums over all ranks, with the units and micro-batches
/// they are averaged over.
#[derive(Debug, Clone, Default)]
pub struct StepLosses {
    pub sums: Vec<f64>,
    /// Whether any micro-batch of any rank computed the term.
    pub present: Vec<bool>,
    pub units: f64,
    pub batches: f64,
}

/// What accumulates between two log lines.
#[derive(Debug, Default)]
pub struct Interval {
    pub losses: StepLosses,
    pub steps: u64,
    pub cells: u64,
    pub tokens: u64,
    pub flops: f64,
    pub grad_norm: f64,
    pub comm_s: f64,
}

impl Interval {
    pub fn add_losses(&mut self, l: &StepLosses) {
        let acc = &mut self.losses;
        acc.sums.resize(l.sums.len(), 0.0);
        acc.present.resize(l.present.len(), false);
        for (k, v) in l.sums.iter().enumerate() {
            acc.sums[k] += v;
            acc.present[k] |= l.present[k];
        }
        acc.units += l.units;
        acc.batches += l.batches;
    }

    /// `train/loss_{term}` for every term computed in the interval, and their weighted sum as
    /// `train/loss`.
    pub fn loss_scalars(&self, terms: &[Term]) -> (Vec<(String, f64)>, f64) {
        let l = &self.losses;
        let mut out = Vec::new();
        let mut total = 0.0;
        for (k, term) in terms.iter().enumerate() {
            let denom = match term.norm {
                Norm::Units => l.units,
                Norm::Batch => l.batches,
            };
            if l.present.get(k).copied().unwrap_or(false) && denom > 0.0 {
                let v = l.sums[k] / denom;
                total += v * term.weight;
                out.push((format!("train/loss_{}", term.name), v));
            }
        }
        out.push(("train/loss".into(), total));
        (out, total)
    }
}

pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
