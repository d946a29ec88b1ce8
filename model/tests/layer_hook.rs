//! The layer hook sharded data parallelism works in: the checkpointed forward and backward tell it when each
//! decoder layer's weights are needed and when its gradients are final (the layers below have none yet).

use model::transformer::LayerEvent;
use model::{Batch, Model};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

#[test]
fn the_checkpointed_passes_report_each_layer_in_order() {
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
    let events: Rc<RefCell<Vec<LayerEvent>>> = Default::default();
    let ev = events.clone();
    model::transformer::set_layer_hook(Some(Rc::new(move |e| {
        ev.borrow_mut().push(e);
        if let LayerEvent::BackwardDone(i) = e {
            s.borrow_mut().push((i, has_grad(i), i > 0 && has_grad(i - 1)))
        }
    })));
    let ids = Tensor::from_slice(&[5i64, 9, 17, 33]).view([1, 4]);
    let (h, ck) = m.net.hidden_states_checkpointed(&Batch::causal(&ids));
    h.sum(Kind::Float).backward();
    m.net.backward_checkpointed(ck, &h.grad());
    let want: Vec<(usize, bool, bool)> = (0..layers).rev().map(|i| (i, true, false)).collect();
    assert_eq!(*seen.borrow(), want);
    // the forward enters and leaves each layer in order; the backward enters each last first, then reports
    // its gradients done, then leaves it
    let mut order: Vec<LayerEvent> = (0..layers).flat_map(|i| [LayerEvent::Enter(i), LayerEvent::Leave(i)]).collect();
    order.extend((0..layers).rev().flat_map(|i| [LayerEvent::Reenter(i), LayerEvent::BackwardDone(i), LayerEvent::Leave(i)]));
    assert_eq!(*events.borrow(), order);
    events.borrow_mut().clear();
    // the plain backward (one autograd pass) has no layer boundaries to report
    seen.borrow_mut().clear();
    m.net.forward(&Batch::causal(&ids)).sum(Kind::Float).backward();
    assert!(seen.borrow().is_empty() && events.borrow().is_empty());
    model::transformer::set_layer_hook(None);
}
