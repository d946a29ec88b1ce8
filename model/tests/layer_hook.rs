//! The layer-backward hook sharded data parallelism reduces gradients in: the checkpointed backward calls it
//! after each decoder layer, last layer first, when that layer's gradients are final (and the layers below
//! have none yet).

use model::{Batch, Model};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

#[test]
fn the_checkpointed_backward_calls_the_hook_after_each_layer_last_first() {
    tch::set_num_threads(1);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let m = Model::load(&dir, None, Device::Cpu).unwrap();
    for t in m.net.params.tensors() {
        let _ = t.shallow_clone().requires_grad_(true);
    }
    let layers = m.net.cfg.num_hidden_layers as usize;
    assert!(layers >= 2);
    // at each call: the layer, whether its gradients are there, whether the layer below has any yet
    let seen: Rc<RefCell<Vec<(usize, bool, bool)>>> = Default::default();
    let (s, net) = (seen.clone(), m.net.params.iter().map(|(n, t)| (n.to_string(), t.shallow_clone())).collect::<Vec<_>>());
    let has_grad = move |layer: usize| net.iter().filter(|(n, _)| n.starts_with(&format!("model.layers.{layer}."))).all(|(_, t)| t.grad().defined());
    model::transformer::set_layer_backward_hook(Some(Rc::new(move |i| s.borrow_mut().push((i, has_grad(i), i > 0 && has_grad(i - 1))))));
    let ids = Tensor::from_slice(&[5i64, 9, 17, 33]).view([1, 4]);
    let (h, ck) = m.net.hidden_states_checkpointed(&Batch::causal(&ids));
    h.sum(Kind::Float).backward();
    m.net.backward_checkpointed(ck, &h.grad());
    let want: Vec<(usize, bool, bool)> = (0..layers).rev().map(|i| (i, true, false)).collect();
    assert_eq!(*seen.borrow(), want);
    // the plain backward (one autograd pass) has no layer boundaries to report
    seen.borrow_mut().clear();
    m.net.forward(&Batch::causal(&ids)).sum(Kind::Float).backward();
    assert!(seen.borrow().is_empty());
    model::transformer::set_layer_backward_hook(None);
}
