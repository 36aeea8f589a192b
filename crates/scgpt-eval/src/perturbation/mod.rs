//! Perturbation-prediction evaluation as GEARS and scGPT's `Tutorial_Perturbation` do it, on
//! plain matrices (no burn, no HDF5). Each file's header says what it follows and where it
//! differs.
//!
//! API:
//! - [`condition`]: `ctrl`, `G+ctrl`/`ctrl+G`, `A+B` strings. [`ConditionFormat::parse`] →
//!   [`Condition`] (`Control`, `Single`, `Double`), `genes()`, `to_gears_string()`;
//!   [`CellGroups::new`] groups cells by condition in first-appearance order.
//! - [`split`]: GEARS's seeded splits, draw for draw on numpy's legacy generator
//!   ([`numpy_rng::LegacyRandomState`]): [`simulation_split`] (with `train_gene_set_size`,
//!   `combo_seen2_train_frac`, seed; val taken from train with 0.9/0.9) and [`no_test_split`]
//!   (either GEARS release's rule). [`PerturbationSplit`] is `split.json`:
//!   `load`, `save` (atomic), `validate` / `load_for_screen` against a screen's conditions.
//! - [`de`]: [`rank_genes_groups`] (scanpy's t-test vs the control, |t| ranking) with GEARS's
//!   non-dropout top 20 → [`DeGenes`] per condition; [`csr_from_dense`].
//! - [`metrics`]: [`evaluate`] over [`ConditionInput`]s (true mean, predicted mean, DE lists) →
//!   [`PerturbationMetrics`] (`pearson`, `pearson_de`, `pearson_delta`, `pearson_de_delta`,
//!   `pearson_de_nodropout`, `pearson_de_delta_nodropout`; overall and per subgroup, undefined =
//!   `None`/null, counted), serialised as `metrics.json`; [`write_per_condition_csv`];
//!   [`group_means`]; [`pearson`].
//! - [`baselines`]: μ̂ per test condition from `no_change`, `train_mean`, `additive`, `linear`
//!   (ridge on gene embeddings): [`baselines::predict`] with [`BaselineInputs`].
//!
//! A typical evaluation: `CellGroups::new(obs condition)`, `group_means` for μ and the control
//! mean m, `rank_genes_groups` for the DE lists, a split (made or loaded), predictions (a model's
//! per-condition mean, or `baselines::predict`), then `evaluate` with the split's `subgroup` map.

pub mod baselines;
pub mod condition;
pub mod de;
pub mod metrics;
pub mod numpy_rng;
pub mod split;

pub use baselines::{BaselineInputs, BaselineKind, GeneEmbeddings, LinearDeltaModel, LinearOptions, TrainingCondition};
pub use condition::{CellGroups, Condition, ConditionFormat};
pub use de::{csr_from_dense, rank_genes_groups, DeGenes, DeOptions};
pub use metrics::{
    evaluate, group_means, pearson, write_per_condition_csv, ConditionInput, ConditionMetrics, MetricOptions, MetricSummary,
    PerturbationMetrics, METRICS,
};
pub use numpy_rng::LegacyRandomState;
pub use split::{no_test_split, simulation_split, NoTestOptions, NoTestRule, PerturbationSplit, SimulationOptions};
