//! Data-pipeline benchmarks.
//!
//! ```text
//! data-bench tokenize --tokenizer DIR --data ../shared/data/gsm8k [--split train] [--repeats 3]
//!     chat template + tokenization (with SFT labels) of every row as a user/assistant conversation,
//!     on 1 thread and on all threads; prints tokens/s.
//! data-bench gen-parquet --out /tmp/big.parquet [--gb 1.0]
//!     writes a synthetic Parquet file of at least that size (incompressible text, 64 MiB row groups).
//! data-bench stream-parquet --path /tmp/big.parquet
//!     streams every row through the public API (stream_records) and prints rows, MB/s and peak RSS.
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use data::rng::SplitMix64;
use data::tokenize::tokenize_records;
use data::{DataConfig, Record, TokenizeConfig, Tokenizer};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Peak resident set size of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// CPU seconds (user + system, all threads) used by this process so far, from /proc/self/stat (USER_HZ = 100).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("tokenize") => tokenize(&args),
        Some("gen-parquet") => gen_parquet(&args),
        Some("stream-parquet") => stream_parquet(&args),
        _ => bail!("usage: data-bench tokenize|gen-parquet|stream-parquet ... (see the source header)"),
    }
}

fn tokenize(args: &[String]) -> Result<()> {
    let dir = PathBuf::from(arg(args, "--tokenizer").context("--tokenizer DIR")?);
    let data = PathBuf::from(arg(args, "--data").unwrap_or_else(|| "../shared/data/gsm8k".into()));
    let repeats: usize = arg(args, "--repeats").map(|r| r.parse()).transpose()?.unwrap_or(3);
    let (tok, template) = Tokenizer::from_dir(&dir)?;
    let template = template.context("the tokenizer_config.json has no chat_template")?;
    let mut cfg = DataConfig::new(&data);
    cfg.split = arg(args, "--split").unwrap_or_else(|| "train".into());
    cfg.prompt = Some("question".into());
    cfg.completion = Some("answer".into());
    let t0 = Instant::now();
    let records: Vec<Record> = data::load_records(&cfg)?;
    eprintln!("loaded {} records in {:.2}s", records.len(), t0.elapsed().as_secs_f64());
    let tcfg = TokenizeConfig { max_length: 1 << 20, ..Default::default() };
    let all = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("tokenizer: {} (vocab {})", dir.display(), tok.vocab_size());
    for threads in [1, all] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        let mut rates = vec![];
        let mut cpu_rates = vec![];
        let mut tokens = 0;
        for _ in 0..repeats {
            let t = Instant::now();
            let c0 = cpu_seconds();
            let (ex, stats) = pool.install(|| tokenize_records(&tok, Some(&template), &records, &tcfg))?;
            let dt = t.elapsed().as_secs_f64();
            let dc = cpu_seconds() - c0;
            tokens = stats.tokens;
            assert_eq!(ex.len(), records.len());
            rates.push(tokens as f64 / dt);
            cpu_rates.push(tokens as f64 / dc);
        }
        cpu_rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if threads == 1 {
            let (ex, _) = tokenize_records(&tok, Some(&template), &records, &tcfg)?;
            for seq_len in [1024, 2048, 4096] {
                let t = Instant::now();
                let p = data::pack(&ex, seq_len, tok.pad_id)?;
                println!(
                    "pack seq_len={seq_len}: {} rows, efficiency {:.4} (best-fit decreasing, {:.0} ms)",
                    p.rows.len(),
                    p.efficiency,
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            let mut eff = vec![];
            for chunk in ex.chunks(8) {
                eff.push(data::pad(chunk, tok.pad_id, None)?.1);
            }
            println!("padded (no packing), batches of 8 in data order: mean efficiency {:.4}", eff.iter().sum::<f64>() / eff.len() as f64);
        }
        rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = rates[rates.len() / 2];
        println!(
            "threads={threads}: {} examples, {tokens} tokens, median {:.0} tokens/s wall ({:.0} examples/s), {:.0} tokens per CPU-second, over {repeats} runs",
            records.len(),
            median,
            median * records.len() as f64 / tokens as f64,
            cpu_rates[cpu_rates.len() / 2]
        );
    }
    // The on-disk cache: first run tokenizes and writes, second run reads.
    let cache = std::env::temp_dir().join(format!("whet-data-bench-cache-{}", std::process::id()));
    for run in ["first (miss)", "second (hit)"] {
        let t = Instant::now();
        let ds = data::tokenize::tokenize_dataset(&cfg, &tok, Some(&template), &tcfg, Some(&cache))?;
        println!("cache {run}: {:?} in {:.3}s ({} examples)", ds.cache, t.elapsed().as_secs_f64(), ds.examples.len());
    }
    let _ = std::fs::remove_dir_all(&cache);
    Ok(())
}

fn gen_parquet(args: &[String]) -> Result<()> {
    let out = PathBuf::from(arg(args, "--out").context("--out FILE")?);
    let gb: f64 = arg(args, "--gb").map(|g| g.parse()).transpose()?.unwrap_or(1.0);
    let target = (gb * 1e9) as u64;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("question", DataType::Utf8, false),
        Field::new("answer", DataType::Utf8, false),
    ]));
    let props = WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        .set_max_row_group_size(64 * 1024)
        .build();
    let tmp = out.with_extension("parquet.tmp");
    let mut w = ArrowWriter::try_new(std::fs::File::create(&tmp)?, schema.clone(), Some(props))?;
    let mut g = SplitMix64::new(42);
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789".chars().collect();
    let mut id = 0i64;
    let mut written = 0u64;
    let t = Instant::now();
    while written < target {
        let n = 8192;
        let mut ids = Vec::with_capacity(n);
        let mut qs = Vec::with_capacity(n);
        let mut ans = Vec::with_capacity(n);
        for _ in 0..n {
            let len = 600 + g.below(800) as usize;
            let q: String = (0..len).map(|_| alphabet[g.below(alphabet.len() as u64) as usize]).collect();
            written += q.len() as u64 + 16;
            qs.push(q);
            ans.push(format!("work...\n#### {}", g.below(100_000)));
            ids.push(id);
            id += 1;
        }
        let cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from(ids)), Arc::new(StringArray::from(qs)), Arc::new(StringArray::from(ans))];
        w.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
    }
    w.close()?;
    std::fs::rename(&tmp, &out)?;
    let size = std::fs::metadata(&out)?.len();
    println!("wrote {} rows, {:.2} GB to {} in {:.1}s", id, size as f64 / 1e9, out.display(), t.elapsed().as_secs_f64());
    Ok(())
}

fn stream_parquet(args: &[String]) -> Result<()> {
    let path = PathBuf::from(arg(args, "--path").context("--path FILE")?);
    let size = std::fs::metadata(&path)?.len();
    let before = peak_rss_mib();
    let mut cfg = DataConfig::new(&path);
    cfg.prompt = Some("question".into());
    cfg.answer = Some("answer".into());
    cfg.answer_format = data::AnswerFormat::Gsm8k;
    cfg.id = Some("id".into());
    let t = Instant::now();
    let mut rows = 0u64;
    let mut chars = 0u64;
    for r in data::stream_records(&cfg)? {
        let r = r?;
        chars += r.prompt()[0].content.len() as u64;
        rows += 1;
    }
    let dt = t.elapsed().as_secs_f64();
    println!(
        "streamed {rows} records ({:.2} GB file, {:.2} GB of prompt text) in {dt:.1}s = {:.0} MB/s; peak RSS {:.0} MiB (before streaming {:.0} MiB)",
        size as f64 / 1e9,
        chars as f64 / 1e9,
        size as f64 / 1e6 / dt,
        peak_rss_mib(),
        before
    );
    Ok(())
}
