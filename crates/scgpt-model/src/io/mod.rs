//! Checkpoints in and out: the original's `best_model.pt` read ([`load`], through the
//! PyTorch zip/pickle reader [`torch_zip`]) and written back ([`checkpoint::export_original`],
//! [`perturbation_checkpoint`]), and this project's native checkpoints ([`checkpoint`]).

pub mod checkpoint;
pub mod load;
pub mod perturbation_checkpoint;
pub mod torch_zip;
