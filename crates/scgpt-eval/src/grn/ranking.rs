//! Ranking metrics of scores against binary labels, as scikit-learn 1.9 computes them:
//! `roc_auc_score` (trapezoids between the ROC points at each distinct score, so tied scores
//! count half) and `average_precision_score` (Σ (R_i − R_{i−1}) P_i over the distinct scores,
//! from the highest down). Both are undefined (None) without positives or without negatives,
//! where scikit-learn raises or warns.

use anyhow::{bail, Result};
use serde::Serialize;

/// (true positives, false positives) after each group of tied scores, highest score first.
fn curve(scores: &[f64], labels: &[bool]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut points = Vec::new();
    let (mut tp, mut fp) = (0f64, 0f64);
    for (p, &i) in order.iter().enumerate() {
        if labels[i] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        if p + 1 == order.len() || scores[order[p + 1]] != scores[i] {
            points.push((tp, fp));
        }
    }
    points
}

fn check(scores: &[f64], labels: &[bool]) -> Result<Option<(f64, f64)>> {
    if scores.len() != labels.len() {
        bail!("ranking metrics: {} scores for {} labels", scores.len(), labels.len());
    }
    if let Some(p) = scores.iter().position(|v| v.is_nan()) {
        bail!("ranking metrics: score {p} is NaN");
    }
    let pos = labels.iter().filter(|&&l| l).count() as f64;
    let neg = labels.len() as f64 - pos;
    Ok(if pos == 0.0 || neg == 0.0 { None } else { Some((pos, neg)) })
}

/// scikit-learn's `roc_auc_score(labels, scores)`.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Result<Option<f64>> {
    let Some((pos, neg)) = check(scores, labels)? else { return Ok(None) };
    let (mut area, mut prev) = (0f64, (0f64, 0f64));
    for (tp, fp) in curve(scores, labels) {
        let (tpr, fpr) = (tp / pos, fp / neg);
        area += (fpr - prev.1) * (tpr + prev.0) / 2.0;
        prev = (tpr, fpr);
    }
    Ok(Some(area))
}

/// scikit-learn's `average_precision_score(labels, scores)`.
pub fn average_precision(scores: &[f64], labels: &[bool]) -> Result<Option<f64>> {
    let Some((pos, _)) = check(scores, labels)? else { return Ok(None) };
    let (mut ap, mut prev_recall) = (0f64, 0f64);
    for (tp, fp) in curve(scores, labels) {
        let recall = tp / pos;
        ap += (recall - prev_recall) * (tp / (tp + fp));
        prev_recall = recall;
    }
    Ok(Some(ap))
}

/// AUROC and AUPRC (average precision) of one set of scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RankingScores {
    pub auroc: Option<f64>,
    pub auprc: Option<f64>,
}

impl RankingScores {
    pub fn of(scores: &[f64], labels: &[bool]) -> Result<Self> {
        Ok(RankingScores { auroc: roc_auc(scores, labels)?, auprc: average_precision(scores, labels)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_cases_by_hand() {
        let l = [true, false, true, false];
        assert_eq!(roc_auc(&[0.9, 0.1, 0.8, 0.2], &l).unwrap(), Some(1.0));
        assert_eq!(average_precision(&[0.9, 0.1, 0.8, 0.2], &l).unwrap(), Some(1.0));
        assert_eq!(roc_auc(&[0.1, 0.9, 0.2, 0.8], &l).unwrap(), Some(0.0));
        // All tied: AUROC 1/2, AP = prevalence.
        assert_eq!(roc_auc(&[1.0; 4], &l).unwrap(), Some(0.5));
        assert_eq!(average_precision(&[1.0; 4], &l).unwrap(), Some(0.5));
        // Ranking + − + −: AP = 1/2·1 + 1/2·2/3.
        let ap = average_precision(&[4.0, 3.0, 2.0, 1.0], &l).unwrap().unwrap();
        assert!((ap - (0.5 + 1.0 / 3.0)).abs() < 1e-15);
        assert_eq!(roc_auc(&[1.0, 2.0], &[true, true]).unwrap(), None);
        assert!(roc_auc(&[f64::NAN, 1.0], &[true, false]).is_err());
        assert!(average_precision(&[1.0], &[true, false]).is_err());
    }
}
