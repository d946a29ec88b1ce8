//! Correctness of the generation engine in fp32 on CPU with the model crate's tiny fixtures: greedy equals
//! step-by-step argmax over full forwards, log-probabilities equal log-softmax of full forwards, determinism,
//! stop tokens and stop strings, budgets and compaction.

mod common;

use common::{load, prompt, reference_greedy, setup, two_letter};
use model::{Batch, Model};
use rollout::{Completion, Engine, EngineConfig, FinishReason, FnDecoder, Request, RolloutError, SamplingParams};
use std::sync::Arc;
use tch::{Kind, Tensor};

fn req(prompt_ids: Vec<i64>, n: usize, params: SamplingParams) -> Request {
    Request { prompt_ids, n, params }
}

/// Full-forward logits `[L, V]` of prompt + completion (one row, no cache).
fn full_logits(m: &Model, prompt: &[i64], c: &Completion) -> Tensor {
    let ids: Vec<i64> = prompt.iter().chain(c.token_ids.iter()).copied().collect();
    let t = Tensor::from_slice(&ids).view([1, -1]);
    tch::no_grad(|| m.net.forward(&Batch { rope_long: Some(c.rope_long), ..Batch::causal(&t) })).squeeze_dim(0)
}

fn engine(m: &Model) -> Engine<'_> {
    Engine::new(&m.net, EngineConfig::default()).unwrap()
}

#[test]
fn greedy_equals_stepwise_argmax_of_full_forwards() {
    setup();
    for fam in ["qwen2", "llama", "qwen3", "phi3"] {
        let m = load(fam);
        let prompts = [prompt(9, 1), prompt(3, 2), prompt(14, 3)];
        let reqs: Vec<Request> = prompts.iter().map(|p| req(p.clone(), 2, SamplingParams::greedy(12))).collect();
        let out = engine(&m).generate(&reqs).unwrap();
        assert_eq!(out.len(), 6);
        for c in &out {
            let p = &prompts[c.request_index];
            // LongRoPE (phi3): the reference uses the factors the engine's cache used
            assert_eq!(c.token_ids, reference_greedy(&m, p, 12, c.rope_long), "{fam} request {}", c.request_index);
            assert_eq!(c.finish_reason, FinishReason::Length);
            assert_eq!((c.prompt_tokens, c.completion_tokens), (p.len(), 12));
            assert!(c.logprobs_sampled.iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn chunked_prefill_equals_one_prefill() {
    setup();
    let m = load("qwen3");
    let reqs: Vec<Request> = [11usize, 4, 7]
        .iter()
        .enumerate()
        .map(|(i, &l)| req(prompt(l, i as i64), 2, SamplingParams { max_new_tokens: 10, seed: Some(i as u64), ..Default::default() }))
        .collect();
    let one = engine(&m).generate(&reqs).unwrap();
    let (chunked, stats) = Engine::new(&m.net, EngineConfig { prefill_chunk: 3, ..Default::default() }).unwrap().generate_with_stats(&reqs).unwrap();
    assert_eq!(stats.prefill_positions, 3 * 11);
    for (a, b) in one.iter().zip(&chunked) {
        assert_eq!(a.token_ids, b.token_ids);
        for (x, y) in a.logprobs_model.iter().zip(&b.logprobs_model) {
            assert!((x - y).abs() <= 1e-5);
        }
    }
    for c in &chunked {
        let p = &reqs[c.request_index].prompt_ids;
        let rows = full_logits(&m, p, c).narrow(0, p.len() as i64 - 1, c.token_ids.len() as i64);
        let want = rows.log_softmax(-1, Kind::Float).gather(1, &Tensor::from_slice(&c.token_ids).view([-1, 1]), false).view([-1]);
        let d = (Tensor::from_slice(&c.logprobs_model) - want).abs().max().double_value(&[]);
        assert!(d <= 1e-5, "{d}");
    }
}

#[test]
fn logprobs_equal_log_softmax_of_full_forward() {
    setup();
    for fam in ["qwen2", "phi3"] {
        let m = load(fam);
        let prompts = [prompt(5, 4), prompt(11, 5)];
        let plain = SamplingParams { temperature: 0.8, max_new_tokens: 24, seed: Some(1), ..Default::default() };
        let filtered = SamplingParams { temperature: 1.3, top_p: 0.9, top_k: 40, min_p: 0.02, max_new_tokens: 24, seed: Some(2), ..Default::default() };
        let reqs = vec![req(prompts[0].clone(), 3, plain.clone()), req(prompts[1].clone(), 2, filtered)];
        let out = engine(&m).generate(&reqs).unwrap();
        let (mut worst_model, mut worst_sampled) = (0f64, 0f64);
        for c in &out {
            let p = &prompts[c.request_index];
            let logits = full_logits(&m, p, c);
            let pl = p.len() as i64;
            let rows = logits.narrow(0, pl - 1, c.token_ids.len() as i64);
            let idx = Tensor::from_slice(&c.token_ids).view([-1, 1]);
            let want_model = rows.log_softmax(-1, Kind::Float).gather(1, &idx, false).view([-1]);
            let got_model = Tensor::from_slice(&c.logprobs_model);
            worst_model = worst_model.max((&got_model - &want_model).abs().max().double_value(&[]));
            if c.request_index == 0 {
                // no filter: the sampled distribution is softmax(logits / T)
                let want = (&rows / 0.8).log_softmax(-1, Kind::Float).gather(1, &idx, false).view([-1]);
                worst_sampled = worst_sampled.max((Tensor::from_slice(&c.logprobs_sampled) - want).abs().max().double_value(&[]));
            } else {
                // filtered: renormalised over fewer tokens, so at least the tempered log-probability
                let tempered = (&rows / 1.3).log_softmax(-1, Kind::Float).gather(1, &idx, false).view([-1]);
                let diff = Tensor::from_slice(&c.logprobs_sampled) - tempered;
                assert!(diff.min().double_value(&[]) >= -1e-5);
                assert!(c.logprobs_sampled.iter().all(|&x| x <= 0.0));
            }
        }
        println!("{fam}: max |logprobs_model - full forward| = {worst_model:.2e}, sampled (T=0.8) {worst_sampled:.2e}");
        assert!(worst_model <= 1e-5, "{fam}: {worst_model}");
        assert!(worst_sampled <= 1e-5, "{fam}: {worst_sampled}");
    }
}

#[test]
fn temperature_zero_and_top_k_one_agree_with_greedy() {
    setup();
    let m = load("qwen2");
    let p = prompt(7, 9);
    let greedy = engine(&m).generate(&[req(p.clone(), 1, SamplingParams::greedy(16))]).unwrap();
    let topk1 = SamplingParams { temperature: 0.7, top_k: 1, max_new_tokens: 16, seed: Some(5), ..Default::default() };
    let t0 = SamplingParams { temperature: 0.0, top_p: 0.5, max_new_tokens: 16, ..Default::default() };
    let out = engine(&m).generate(&[req(p.clone(), 3, topk1), req(p.clone(), 2, t0)]).unwrap();
    for c in &out {
        assert_eq!(c.token_ids, greedy[0].token_ids);
        // a different batch shape: equal up to floating-point rounding
        for (x, y) in c.logprobs_model.iter().zip(&greedy[0].logprobs_model) {
            assert!((x - y).abs() <= 1e-5);
        }
    }
    // a sampled request, by contrast, does not follow the argmax every time
    let s = SamplingParams { temperature: 1.0, max_new_tokens: 16, seed: Some(5), ..Default::default() };
    let out = engine(&m).generate(&[req(p, 4, s)]).unwrap();
    assert!(out.iter().any(|c| c.token_ids != greedy[0].token_ids));
}

#[test]
fn same_seed_same_samples_and_batch_composition_does_not_change_them() {
    setup();
    let m = load("qwen2");
    let params = |seed| SamplingParams { temperature: 1.0, top_p: 0.95, max_new_tokens: 20, seed: Some(seed), ..Default::default() };
    let target = req(prompt(6, 1), 4, params(42));
    let e = engine(&m);
    let alone = e.generate(std::slice::from_ref(&target)).unwrap();
    // identical on repeat
    assert_eq!(alone, e.generate(std::slice::from_ref(&target)).unwrap());
    // samples differ from each other, and with another seed
    assert!(alone.iter().any(|c| c.token_ids != alone[0].token_ids));
    let other_seed = e.generate(&[req(prompt(6, 1), 4, params(43))]).unwrap();
    assert_ne!(alone[0].token_ids, other_seed[0].token_ids);
    // co-batched with longer and shorter prompts (different padding and batch shape), placed second
    let mixed = e
        .generate(&[req(prompt(15, 2), 3, params(1)), target.clone(), req(prompt(2, 3), 2, SamplingParams::greedy(30))])
        .unwrap();
    let mixed: Vec<&Completion> = mixed.iter().filter(|c| c.request_index == 1).collect();
    // split over waves: two rows at a time (the prompt is encoded again for each part)
    let small = Engine::new(&m.net, EngineConfig { max_batch_seqs: 2, ..Default::default() }).unwrap();
    let (split, stats) = small.generate_with_stats(std::slice::from_ref(&target)).unwrap();
    assert_eq!(stats.waves, 2);
    for (a, (b, c)) in alone.iter().zip(mixed.iter().zip(&split)) {
        assert_eq!(a.token_ids, b.token_ids, "sample {}", a.sample_index);
        assert_eq!(a.token_ids, c.token_ids, "sample {}", a.sample_index);
        for (x, y) in a.logprobs_model.iter().zip(&b.logprobs_model) {
            assert!((x - y).abs() <= 1e-5);
        }
    }
    // the seed of a request without one comes from the engine seed and its position
    let unseeded = SamplingParams { max_new_tokens: 10, ..Default::default() };
    let a = e.generate(&[req(prompt(4, 7), 2, unseeded.clone())]).unwrap();
    assert_eq!(a, e.generate(&[req(prompt(4, 7), 2, unseeded.clone())]).unwrap());
    let e2 = Engine::new(&m.net, EngineConfig { seed: 99, ..Default::default() }).unwrap();
    assert_ne!(a, e2.generate(&[req(prompt(4, 7), 2, unseeded)]).unwrap());
}

#[test]
fn stop_strings_spanning_tokens_are_honoured() {
    setup();
    let m = load("llama");
    let mut e = engine(&m);
    e.set_decoder(Arc::new(FnDecoder(two_letter)));
    let p = prompt(8, 2);
    let free = e.generate(&[req(p.clone(), 1, SamplingParams::greedy(20))]).unwrap().remove(0);
    let text = free.text.clone().unwrap();
    assert_eq!(text, two_letter(&free.token_ids));
    // the last letter of token 5 and the first of token 6
    let stop = text[11..13].to_string();
    let at = text.find(&stop).unwrap();
    let want_tokens = (at + 3) / 2; // the token that completes the first match
    let params = SamplingParams { stop_strings: vec!["not there".into(), stop.clone()], ..SamplingParams::greedy(20) };
    let c = e.generate(&[req(p.clone(), 1, params)]).unwrap().remove(0);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert_eq!(c.stop_string.as_deref(), Some(stop.as_str()));
    assert_eq!(c.text.as_deref(), Some(&text[..at]));
    assert_eq!(c.token_ids, free.token_ids[..want_tokens.min(20)].to_vec());
    assert_eq!(c.completion_tokens, c.token_ids.len());
    // sampled requests honour them as well
    let sp = SamplingParams { temperature: 1.0, max_new_tokens: 30, seed: Some(3), stop_strings: vec!["aA".into(), "bB".into()], ..Default::default() };
    for c in e.generate(&[req(p, 6, sp)]).unwrap() {
        let full = two_letter(&c.token_ids);
        let t = c.text.unwrap();
        if c.finish_reason == FinishReason::Stop {
            let s = c.stop_string.unwrap();
            assert!(full.starts_with(&(t.clone() + &s)));
            assert!(!two_letter(&c.token_ids[..c.token_ids.len() - 1]).contains("aA"));
            assert!(!two_letter(&c.token_ids[..c.token_ids.len() - 1]).contains("bB"));
        } else {
            assert!(!full.contains("aA") && !full.contains("bB"));
        }
    }
}

#[test]
fn stop_tokens_eos_and_compaction() {
    setup();
    let m = load("qwen2");
    let a = prompt(5, 1);
    let b = prompt(9, 2);
    let free = engine(&m).generate(&[req(a.clone(), 1, SamplingParams::greedy(24))]).unwrap().remove(0);
    // the first token of `a`'s greedy output that did not appear before it becomes a stop token
    let k = (2..free.token_ids.len()).find(|&k| !free.token_ids[..k].contains(&free.token_ids[k])).unwrap();
    let stop = free.token_ids[k];
    let cfg = EngineConfig { compact_fraction: 0.0, ..Default::default() };
    let e = Engine::new(&m.net, cfg.clone()).unwrap();
    let stop_a = SamplingParams { stop_token_ids: vec![stop], ..SamplingParams::greedy(24) };
    let (out, stats) = e.generate_with_stats(&[req(a.clone(), 1, stop_a), req(b.clone(), 1, SamplingParams::greedy(24))]).unwrap();
    assert_eq!(out[0].finish_reason, FinishReason::Stop);
    assert_eq!(out[0].token_ids, free.token_ids[..=k].to_vec());
    assert_eq!(out[1].finish_reason, FinishReason::Length);
    assert_eq!(out[1].completion_tokens, 24);
    // `a` left the batch after its stop: fewer row-steps than two rows for every step
    assert_eq!(stats.compactions, 1);
    assert_eq!(stats.decode_steps, 23);
    assert_eq!(stats.decode_row_steps, 23 + k);
    // `b` is unaffected by `a` leaving
    let alone = engine(&m).generate(&[req(b.clone(), 1, SamplingParams::greedy(24))]).unwrap();
    assert_eq!(out[1].token_ids, alone[0].token_ids);
    // the engine's eos ids stop samples unless ignore_eos
    let eos = Engine::new(&m.net, EngineConfig { eos_token_ids: vec![stop], ..cfg }).unwrap();
    let c = eos.generate(&[req(a.clone(), 1, SamplingParams::greedy(24))]).unwrap().remove(0);
    assert_eq!(c.token_ids, free.token_ids[..=k].to_vec());
    let ign = SamplingParams { ignore_eos: true, ..SamplingParams::greedy(24) };
    let c = eos.generate(&[req(a, 1, ign)]).unwrap().remove(0);
    assert_eq!(c.token_ids, free.token_ids);
    assert_eq!(c.finish_reason, FinishReason::Length);
}

#[test]
fn cache_budget_queues_waves_or_reports_what_does_not_fit() {
    setup();
    let m = load("qwen2");
    let reqs: Vec<Request> = (0..5).map(|i| req(prompt(4 + i, i as i64), 3, SamplingParams { max_new_tokens: 10, seed: Some(i as u64), ..Default::default() })).collect();
    let (one, s1) = engine(&m).generate_with_stats(&reqs).unwrap();
    assert_eq!(s1.waves, 1);
    // 18 prompt + new tokens per row at most: 40 tokens hold two rows
    let tight = Engine::new(&m.net, EngineConfig { cache_budget_tokens: 40, ..Default::default() }).unwrap();
    let (many, s2) = tight.generate_with_stats(&reqs).unwrap();
    assert!(s2.waves >= 8, "{s2:?}");
    assert_eq!(many.len(), 15);
    for (a, b) in one.iter().zip(&many) {
        assert_eq!((a.request_index, a.sample_index, &a.token_ids), (b.request_index, b.sample_index, &b.token_ids));
    }
    let too_big = Engine::new(&m.net, EngineConfig { cache_budget_tokens: 12, ..Default::default() }).unwrap();
    let err = too_big.generate(&reqs).unwrap_err();
    assert!(matches!(err, RolloutError::CacheBudget { index: 0, needed: 14, .. }), "{err}");
    assert!(err.to_string().contains("cache_budget_tokens"));
}

#[test]
fn bad_requests_are_errors_not_panics() {
    setup();
    let m = load("qwen2");
    let e = engine(&m);
    let cases = [
        (req(vec![], 1, SamplingParams::default()), "empty prompt"),
        (req(vec![1, 999], 1, SamplingParams::default()), "outside the vocabulary"),
        (req(vec![1], 0, SamplingParams::default()), "n must be"),
        (req(vec![1], 1, SamplingParams { top_p: 1.5, ..Default::default() }), "top_p"),
        (req(vec![1], 1, SamplingParams { stop_strings: vec!["x".into()], ..Default::default() }), "decoder"),
    ];
    for (r, want) in cases {
        let err = e.generate(&[req(vec![1, 2], 1, SamplingParams::greedy(2)), r]).unwrap_err().to_string();
        assert!(err.contains("request 1") && err.contains(want), "{err}");
    }
    assert!(Engine::new(&m.net, EngineConfig { max_batch_seqs: 0, ..Default::default() }).is_err());
    assert!(Engine::new(&m.net, EngineConfig { eos_token_ids: vec![256], ..Default::default() }).is_err());
    // zero new tokens: an empty completion, no compute
    let c = e.generate(&[req(vec![1, 2], 2, SamplingParams::greedy(0))]).unwrap();
    assert_eq!(c.len(), 2);
    assert!(c.iter().all(|c| c.token_ids.is_empty() && c.finish_reason == FinishReason::Length));
    assert!(e.generate(&[]).unwrap().is_empty());
}

#[test]
fn decoding_on_fused_weights_equals_decoding_on_the_parameters() {
    setup();
    for fam in ["qwen2", "qwen3", "phi3"] {
        let m = load(fam);
        // rows finish at different steps (stop ids), so the fused copy is re-prepared for each row count (with one
        // thread on an AVX-512 CPU the copy is the native step's: model::native)
        let params = |i: u64| SamplingParams { max_new_tokens: 6 + 3 * i as usize, seed: Some(i), temperature: 0.9, ..Default::default() };
        // prompts of equal length (requests 0 and 1, 2 and 3) but different tokens: the samples of one request
        // share its prompt's cached slots (KvCache::shared_prefix), those of another request must not
        let reqs: Vec<Request> = (0..4).map(|i| req(prompt(5 + 2 * (i / 2) as usize, i as i64), 3, params(i))).collect();
        let run = |fuse_weights: bool| {
            Engine::new(&m.net, EngineConfig { fuse_weights, compact_fraction: 0.0, ..Default::default() }).unwrap().generate_with_stats(&reqs).unwrap()
        };
        let ((plain, s0), (fused, s1)) = (run(false), run(true));
        assert_eq!(s0, s1);
        assert!(s1.compactions >= 3, "{fam}: {s1:?}");
        for (a, b) in plain.iter().zip(&fused) {
            assert_eq!(a.token_ids, b.token_ids, "{fam}");
            for (x, y) in a.logprobs_model.iter().zip(&b.logprobs_model).chain(a.logprobs_sampled.iter().zip(&b.logprobs_sampled)) {
                assert!((x - y).abs() <= 1e-5, "{fam}: {x} vs {y}");
            }
        }
    }
}

/// Requests whose samples end at different steps, with prompts of 3 to 15 tokens, more rows than a batch holds.
fn staggered_requests(params: impl Fn(usize) -> SamplingParams) -> Vec<Request> {
    let lens = [3usize, 15, 5, 11, 4, 9, 14];
    lens.iter().enumerate().map(|(i, &l)| req(prompt(l, i as i64), 1 + i % 2, params(i))).collect()
}

#[test]
fn slot_refill_lets_waiting_sequences_join_with_the_same_results() {
    setup();
    for fam in ["qwen2", "phi3"] {
        let m = load(fam);
        // LongRoPE (phi3): a batch uses one factor set, chosen from its first cache's capacity, and sequences
        // that join inherit it, so compare both schedules with the factors fixed
        let run_with = |slot_refill: bool, rope_long: Option<bool>, params: &dyn Fn(usize) -> SamplingParams| {
            let cfg = EngineConfig { max_batch_seqs: 3, compact_fraction: 0.0, slot_refill, rope_long, ..Default::default() };
            Engine::new(&m.net, cfg).unwrap().generate_with_stats(&staggered_requests(params)).unwrap()
        };
        let run = |slot_refill: bool, params: &dyn Fn(usize) -> SamplingParams| run_with(slot_refill, Some(false), params);
        let greedy = |i: usize| SamplingParams::greedy(2 + 3 * (i % 4));
        let sampled = |i: usize| SamplingParams { max_new_tokens: 2 + 3 * (i % 4), temperature: 0.8, seed: Some(i as u64), ..Default::default() };
        for params in [&greedy as &dyn Fn(usize) -> SamplingParams, &sampled] {
            let (waves, s0) = run(false, params);
            let (refill, s1) = run(true, params);
            assert!(s1.refills >= 2 && s1.waves < s0.waves, "{fam}: {s0:?} vs {s1:?}");
            assert!(s1.decode_steps < s0.decode_steps, "{fam}: {s0:?} vs {s1:?}");
            assert_eq!(s0.generated_tokens, s1.generated_tokens);
            assert_eq!(waves.len(), refill.len());
            for (a, b) in waves.iter().zip(&refill) {
                assert_eq!((a.request_index, a.sample_index, &a.token_ids), (b.request_index, b.sample_index, &b.token_ids), "{fam}");
                for (x, y) in a.logprobs_model.iter().zip(&b.logprobs_model) {
                    assert!((x - y).abs() <= 1e-5, "{fam}: {x} vs {y}");
                }
            }
        }
        // greedy with refill equals step-by-step argmax over full forwards, also for the 15-token prompt that
        // joins a batch whose cache is shorter than it (the running rows are shifted right)
        let reqs = staggered_requests(&greedy);
        let (out, _) = run_with(true, None, &greedy);
        for c in &out {
            let p = &reqs[c.request_index].prompt_ids;
            assert_eq!(c.token_ids, reference_greedy(&m, p, c.completion_tokens, c.rope_long), "{fam} request {}", c.request_index);
        }
    }
}

#[test]
fn slot_refill_stays_within_the_cache_budget() {
    setup();
    let m = load("qwen2");
    let params = |i: usize| SamplingParams { max_new_tokens: 2 + 4 * (i % 3), seed: Some(7 + i as u64), ..Default::default() };
    let reqs = staggered_requests(params);
    let all = engine(&m).generate(&reqs).unwrap();
    for budget in [30i64, 45, 80] {
        let cfg = EngineConfig { cache_budget_tokens: budget, compact_fraction: 0.0, ..Default::default() };
        let (out, stats) = Engine::new(&m.net, cfg).unwrap().generate_with_stats(&reqs).unwrap();
        assert!(stats.peak_cache_tokens <= budget, "budget {budget}: {stats:?}");
        for (a, b) in all.iter().zip(&out) {
            assert_eq!(&a.token_ids, &b.token_ids, "budget {budget}");
        }
    }
}
