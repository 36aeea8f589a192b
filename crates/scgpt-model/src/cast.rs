//! Casting a module's float parameters, keeping their ids.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{FloatDType, Tensor};

/// How a cast parameter relates to the source in the autodiff graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CastGraph {
    /// A new leaf (keeps `require_grad`): the cast module is a module of its own.
    Leaf,
    /// The cast is recorded, so gradients of the cast module reach the source parameters.
    Recorded,
}

struct CastParams {
    dtype: FloatDType,
    graph: CastGraph,
}

impl ModuleMapper for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        if tensor.dtype() == self.dtype.into() {
            // Already there: the same tensor, whatever its layout.
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let cast = match self.graph {
            CastGraph::Leaf => {
                let require_grad = tensor.is_require_grad();
                let t = Tensor::<D>::from_inner(tensor.inner().cast(self.dtype));
                if require_grad {
                    t.require_grad()
                } else {
                    t
                }
            }
            CastGraph::Recorded => tensor.cast(self.dtype),
        };
        Param::from_mapped_value(id, cast, mapper)
    }
}

/// `model` with every float parameter cast to `dtype`.
pub fn cast_params<M: Module>(model: M, dtype: FloatDType, graph: CastGraph) -> M {
    model.map(&mut CastParams { dtype, graph })
}
