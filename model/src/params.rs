//! An ordered store of named parameters with Hugging Face names.
//!
//! The order is the order of creation (embedding, layers in order, final norm, head): it is fixed for a
//! config, so optimizers, checkpoints and gradient all-reduce buckets see the parameters in the same order
//! on every run and every rank.

use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// How new parameters are filled.
#[derive(Debug, Clone, Copy)]
pub enum Fill {
    /// Left uninitialised: weights are about to be loaded.
    Empty,
    /// Normal(0, std), as transformers initialises linear and embedding weights.
    Normal(f64),
    Zeros,
    Ones,
}

pub struct ParamStore {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
    pub kind: Kind,
    pub device: Device,
}

impl ParamStore {
    pub fn new(kind: Kind, device: Device) -> Self {
        ParamStore { names: vec![], tensors: vec![], index: HashMap::new(), kind, device }
    }

    /// Creates (or returns, when it exists) the parameter `name` with `shape`.
    pub fn get_or_create(&mut self, name: &str, shape: &[i64], fill: Fill) -> Tensor {
        if let Some(&i) = self.index.get(name) {
            return self.tensors[i].shallow_clone();
        }
        let opts = (self.kind, self.device);
        let t = tch::no_grad(|| match fill {
            Fill::Empty => Tensor::empty(shape, opts),
            Fill::Zeros => Tensor::zeros(shape, opts),
            Fill::Ones => Tensor::ones(shape, opts),
            Fill::Normal(std) => Tensor::randn(shape, (Kind::Float, self.device)).g_mul_scalar_(std).to_kind(self.kind),
        });
        self.index.insert(name.to_string(), self.tensors.len());
        self.names.push(name.to_string());
        self.tensors.push(t.shallow_clone());
        t
    }

    /// Adds `t` as the parameter `name` (a view of another store's tensor, say); replaces one of that name.
    pub fn insert(&mut self, name: &str, t: Tensor) {
        match self.index.get(name) {
            Some(&i) => self.tensors[i] = t,
            None => {
                self.index.insert(name.to_string(), self.tensors.len());
                self.names.push(name.to_string());
                self.tensors.push(t);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(|s| s.as_str()).zip(self.tensors.iter())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn numel(&self) -> i64 {
        self.tensors.iter().map(|t| t.numel() as i64).sum()
    }

    /// Marks every parameter as requiring (or not) gradients.
    pub fn set_requires_grad(&mut self, on: bool) {
        for t in &mut self.tensors {
            let _ = t.requires_grad_(on);
        }
    }

    /// Zeroes (drops) every gradient.
    pub fn zero_grad(&mut self) {
        for t in &mut self.tensors {
            t.zero_grad();
        }
    }
}
