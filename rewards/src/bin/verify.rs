//! `cargo run -p rewards --bin verify -- --input cases.jsonl`
fn main() {
    if let Err(e) = rewards::cli::run_verify_cli(std::env::args().skip(1)) {
        eprintln!("verify: {e:#}");
        std::process::exit(2);
    }
}
