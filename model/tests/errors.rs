//! Bad model inputs give one clear error naming the file and the problem.

use model::{Model, ModelConfig};
use std::path::{Path, PathBuf};
use tch::Device;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    model::runtime::preload_cuda();
    match Model::load(dir, None, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_config_key() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen2"), t.path());
    edit_config(t.path(), |c| {
        c.remove("hidden_size");
    });
    let e = load_err(t.path());
    assert!(e.contains("config.json") && e.contains("missing key `hidden_size`"), "{e}");
}

#[test]
fn unknown_architecture() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen2"), t.path());
    edit_config(t.path(), |c| {
        c.insert("model_type".into(), "gpt_neox".into());
    });
    let e = load_err(t.path());
    assert!(e.contains("config.json") && e.contains("unsupported architecture model_type = \"gpt_neox\""), "{e}");
}

#[test]
fn wrong_type_in_config() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama"), t.path());
    edit_config(t.path(), |c| {
        c.insert("num_hidden_layers".into(), "two".into());
    });
    let e = load_err(t.path());
    assert!(e.contains("`num_hidden_layers` must be an integer"), "{e}");
}

#[test]
fn weights_that_do_not_match_the_config() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&fixture("llama"), t.path());
    edit_config(t.path(), |c| {
        c.insert("intermediate_size".into(), 100.into());
    });
    let e = load_err(t.path());
    assert!(e.contains("model.safetensors") && e.contains("has shape") && e.contains("config implies"), "{e}");

    // more layers in the config than in the file
    copy_dir(&fixture("llama"), t.path());
    edit_config(t.path(), |c| {
        c.insert("num_hidden_layers".into(), 3.into());
    });
    let e = load_err(t.path());
    assert!(e.contains("missing from the weights") && e.contains("model.layers.2."), "{e}");

    // a family whose parameter names differ (Phi-3 expects fused projections)
    copy_dir(&fixture("llama"), t.path());
    edit_config(t.path(), |c| {
        c.insert("model_type".into(), "phi3".into());
        c.remove("rope_parameters");
    });
    let e = load_err(t.path());
    assert!(e.contains("not parameters of this architecture"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let t = tempfile::tempdir().unwrap();
    copy_dir(&fixture("qwen3"), t.path());
    let p = t.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_err(t.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated or corrupt"), "{e}");
}

#[test]
fn pickle_checkpoints_are_refused_with_a_conversion_hint() {
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("qwen2").join("config.json"), t.path().join("config.json")).unwrap();
    std::fs::write(t.path().join("pytorch_model.bin"), b"not really a pickle").unwrap();
    let e = load_err(t.path());
    assert!(e.contains("pytorch_model.bin") && e.contains("refuses pickle") && e.contains("safe_serialization=True"), "{e}");
}

#[test]
fn missing_directory_and_config() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model") && e.contains("does not exist"), "{e}");
    let t = tempfile::tempdir().unwrap();
    let e = ModelConfig::from_path(t.path()).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
}
