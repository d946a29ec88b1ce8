//! The committed corpus of bad recipes (tests/recipes/bad/*.toml): each must fail `--dry-run` with the
//! messages its `# expect:` lines name, as one report, without a panic. The shipped recipes must pass.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_bad_recipe_gets_its_expected_messages() {
    let dir = root().join("tests/recipes/bad");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expects: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expects.is_empty(), "{} has no # expect: line", path.display());
        let out = Command::new(env!("CARGO_BIN_EXE_train")).arg("--recipe").arg(&path).arg("--dry-run").current_dir(&dir).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was accepted", path.display());
        assert!(!stderr.contains("panicked"), "{}: {stderr}", path.display());
        for x in expects {
            assert!(stderr.contains(x), "{}: expected {x:?} in:\n{stderr}", path.display());
        }
        n += 1;
    }
    assert!(n >= 10, "only {n} bad recipes");
}

#[test]
fn shipped_recipes_pass_dry_run_and_overrides_apply() {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--recipe")
        .arg(root().join("recipes/demo.toml"))
        .args(["--dry-run", "--set", "stage.0.lr=0.01", "--set", "run.seed=9"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("lr = 0.01") && stdout.contains("seed = 9"), "{stdout}");
    assert!(stdout.contains("# plan") && stdout.contains("M parameters"), "{stdout}");
    // an override naming an unknown key is reported like a typo in the file
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--recipe")
        .arg(root().join("recipes/demo.toml"))
        .args(["--dry-run", "--set", "stage.0.learning_rat=0.01"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("unknown key `learning_rat`"), "{stderr}");
}
