//! Evaluation and the baselines scGPT is compared with; no burn, no HDF5.
//!
//! - [`classification`]: accuracy and macro/weighted F1 as scikit-learn computes them, the
//!   confusion matrix as CSV and PNG.
//! - [`baseline`]: the annotation baseline a user tries first (normalise, log1p, 2,000 HVGs,
//!   PCA 50, logistic regression), matching scanpy + scikit-learn.
//! - [`knn`]: reference mapping by a cosine k-nearest-neighbour vote on embeddings.
//! - [`preprocess`]: scanpy's normalize_total + log1p, filter_genes and highly_variable_genes
//!   (seurat_v3, cell_ranger, seurat; per batch), gene for gene.
//! - [`scib`]: scIB's integration metrics on an embedding, with [`neighbors`] (kNN graph and
//!   UMAP connectivities), [`leiden`], [`pcr`] and [`lisi`].
//! - [`harmony`]: Harmony batch correction of an embedding (harmonypy 2.1.0's algorithm).
//! - [`umap`]: a 2-D UMAP layout and the picture of it coloured by label and by batch.
//! - [`perturbation`]: perturbation prediction as GEARS/scGPT score it: condition strings, GEARS's
//!   seeded splits, DE genes (scanpy's t-test), the Pearson metrics and the simple baselines.
//! - [`perturbation_plot`]: the GEARS perturbation picture (true change over control as boxes,
//!   the prediction as red dots, per top DE gene).
//! - [`grn`]: GRN from gene embeddings: programs, activity, enrichment, reference scoring, pictures.
//! - [`bar_chart`]: a horizontal bar chart of ranked scores (`scgpt grn attention`'s top targets).

mod atomic;
pub mod bar_chart;
pub mod baseline;
pub mod classification;
pub mod csr;
pub mod grn;
pub mod harmony;
mod heatmap;
pub mod knn;
pub mod leiden;
pub mod lisi;
mod loess;
pub mod logreg;
pub mod neighbors;
pub mod pca;
pub mod pcr;
pub mod perturbation;
pub mod perturbation_plot;
pub mod preprocess;
pub mod scib;
pub mod umap;

/// Writes a file under a temporary name in the same folder, then renames it into place.
pub use atomic::write as write_atomic;
pub use baseline::{annotation_baseline, BaselineOptions, BaselinePrediction};
pub use classification::{ClassMetrics, ClassificationReport};
pub use csr::{keep_columns, CsrMatrix, OwnedCsr};
pub use knn::{knn_vote, KnnVote};
