//! Gene regulatory networks from gene embeddings, model-free: scGPT's `Tutorial_GRN` /
//! `scgpt/tasks/grn.py` (`GeneEmbedding`) steps on plain vectors and matrices, plus the
//! enrichment and reference-network scoring a user checks programs and edges with. The CLI feeds
//! it the gene embeddings a model gives and the data. Each file's header says what it follows.
//!
//! API:
//! - [`embedding`]: [`GeneEmbeddings::new`] (names + row-major vectors, checked);
//!   `cosine_block`; [`top_k_edges`] (default k [`DEFAULT_TOP_K`] = 20, no self edges) →
//!   [`Edge`] (`source`, `target`, `cosine`); [`write_edges_tsv`].
//! - [`programs`]: [`gene_programs`] with [`ProgramOptions`] (15 neighbours, resolution 40,
//!   min_program_size 5) → [`GenePrograms`] (`clusters`, `programs`, `gene_sets`, `write_tsv`):
//!   scanpy's neighbours + UMAP connectivities, then our Leiden.
//! - [`score`]: [`GeneScorer`] (a CSR matrix + gene names) `.score(genes, &ScoreGenesOptions)` =
//!   scanpy 1.11.5's `sc.tl.score_genes` (ctrl_size 50, n_bins 25, random_state 0, numpy's
//!   legacy generator) → [`GeneScore`].
//! - [`activity`]: [`program_activity`] (score per program, then scikit-learn's min–max
//!   scaling: scGPT's `score_metagenes`) → [`ProgramActivity`]; [`activity_by_cell_type`] →
//!   [`ActivityTable`] (`to_csv`, `write_csv`); [`min_max_scale`].
//! - [`gmt`]: [`GeneSet`], [`parse_gmt`], [`read_gmt`].
//! - [`enrich`]: [`enrichment`] of a gene list in gene sets within a universe (hypergeometric
//!   upper tail, Benjamini–Hochberg) → [`Enrichment`] (`to_tsv`, `write_tsv`);
//!   [`hypergeom_sf`], [`benjamini_hochberg`].
//! - [`reference`]: [`ReferenceNetwork::read`]/`parse` (2–3 column TSV, optional header).
//! - [`evaluate`]: [`evaluate_against_reference`] (candidate pairs, AUROC/AUPRC of the model and
//!   of the `coexpression` and `random` baselines) → [`ReferenceEvaluation`] (Serialize);
//!   [`EdgeScorer`] (implemented by [`GeneEmbeddings`] as cosine, [`DenseScores`],
//!   [`Coexpression`], [`RandomScores`]); [`Candidates`].
//! - [`ranking`]: [`roc_auc`], [`average_precision`] (scikit-learn's), [`RankingScores`].
//! - [`plot`]: [`write_program_network_png`], [`write_activity_heatmap_png`].
//!
//! A typical run: embeddings → `gene_programs` → `gene_sets` → `GeneScorer::new(x, genes)` →
//! `program_activity` → `activity_by_cell_type` → pictures; `top_k_edges` for the edge list;
//! `enrichment(program genes, read_gmt(..), universe = embedding genes)`;
//! `evaluate_against_reference(embedding genes, &embeddings, &reference, Some((x, genes)), seed)`.

pub mod activity;
pub mod embedding;
pub mod enrich;
pub mod evaluate;
pub mod gmt;
pub mod plot;
pub mod programs;
pub mod ranking;
pub mod reference;
pub mod score;

pub use activity::{activity_by_cell_type, min_max_scale, program_activity, ActivityTable, ProgramActivity};
pub use embedding::{edges_to_tsv, top_k_edges, write_edges_tsv, Edge, GeneEmbeddings, DEFAULT_TOP_K};
pub use enrich::{benjamini_hochberg, enrichment, hypergeom_sf, Enrichment, EnrichmentRow};
pub use evaluate::{evaluate_against_reference, Candidates, Coexpression, DenseScores, EdgeScorer, RandomScores, ReferenceEvaluation};
pub use gmt::{parse_gmt, read_gmt, GeneSet};
pub use plot::{write_activity_heatmap_png, write_program_network_png, MAX_HEATMAP_CELL_TYPES, MAX_HEATMAP_PROGRAMS, MAX_NETWORK_GENES};
pub use programs::{gene_programs, GenePrograms, Program, ProgramOptions};
pub use ranking::{average_precision, roc_auc, RankingScores};
pub use reference::{ReferenceEdge, ReferenceNetwork};
pub use score::{GeneScore, GeneScorer, ScoreGenesOptions};
