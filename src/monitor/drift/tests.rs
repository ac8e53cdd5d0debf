//! Drift detection on synthetic windows: seeded traffic drawn from a
//! reference distribution must (almost) never fire; a shift of known size
//! fires within K windows and clears K windows after it ends.

use super::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A synthetic traffic distribution.
#[derive(Debug, Clone, Copy)]
struct Traffic {
    /// Mean of ln(prompt length).
    len_mu: f64,
    /// Share of prompts written in Cyrillic.
    cyrillic: f64,
    /// Token ids drawn from `lo..lo + 1000`, Zipf-like: half of them
    /// among the first ten ids (as in text, a few tokens dominate).
    lo: u32,
    /// Mean per-request entropy.
    entropy: f64,
}

const BASE: Traffic = Traffic {
    len_mu: 3.0,
    cyrillic: 0.0,
    lo: 0,
    entropy: 3.0,
};

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

struct Gen {
    rng: ChaCha8Rng,
    prompt: Vec<u32>,
}

impl Gen {
    fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            prompt: vec![],
        }
    }

    /// Feeds one request of `t` to `r`.
    fn one(&mut self, r: &Recorder, t: Traffic, now: Instant) {
        let rng = &mut self.rng;
        let len = (t.len_mu + 0.5 * normal(rng)).exp().clamp(1.0, 4000.0) as u32;
        self.prompt.clear();
        for _ in 0..len {
            let u: f64 = rng.random();
            self.prompt.push(t.lo + (1000.0 * u.powi(6)) as u32);
        }
        let mut profile = TextProfile::default();
        let letters = len * 3 + rng.random_range(0..=len);
        let class = if rng.random::<f64>() < t.cyrillic {
            5
        } else {
            0
        };
        profile[class] = letters;
        profile[3] = len;
        profile[2] = rng.random_range(0..4);
        profile[1] = rng.random_range(0..2);
        // Geometric output length, capped at 32.
        let mut out = 1;
        while out < 32 && rng.random::<f64>() > 0.08 {
            out += 1;
        }
        let error = rng.random::<f64>() < 0.005;
        let ttft = 0.05 * (0.3 * normal(rng)).exp();
        let o = Observation {
            prompt_len: len,
            output_len: out,
            finish: (!error).then_some(if out == 32 { 1 } else { 0 }),
            error,
            ttft_s: ttft,
            e2e_s: ttft + 0.02 * f64::from(out),
            entropy: Some(t.entropy + 0.6 * normal(rng)),
        };
        if rng.random::<f64>() < 0.1 {
            r.record_prompt_logprob(-4.0 + normal(rng));
        }
        r.record_at(&o, &self.prompt, &profile, now);
    }

    fn window(&mut self, r: &Recorder, t: Traffic, n: usize, now: Instant) {
        for _ in 0..n {
            self.one(r, t, now);
        }
    }
}

fn recorder(cfg: DriftConfig) -> (Recorder, tokio::sync::broadcast::Receiver<DriftTransition>) {
    let r = Recorder::new("synthetic", "v1");
    let (tx, rx) = tokio::sync::broadcast::channel(64);
    r.configure(cfg, Some(tx));
    (r, rx)
}

#[test]
fn false_alarms_stay_under_one_percent_over_200_seeded_trials() {
    let cfg = DriftConfig::default();
    let windows = 20;
    let mut fired = 0;
    let mut warn_windows = 0;
    let mut drift_windows = 0;
    let mut per_signal: BTreeMap<String, (f64, usize, usize)> = BTreeMap::new();
    for seed in 0..200 {
        let (r, mut rx) = recorder(cfg.clone());
        let mut g = Gen::new(seed);
        let now = Instant::now();
        g.window(&r, BASE, cfg.reference_requests, now);
        g.window(&r, BASE, windows * cfg.window_requests, now);
        let st = r.status();
        assert_eq!(st["windows"], windows as u64, "seed {seed}");
        let last = &st["last_window"]["scores"];
        for s in last.as_array().unwrap() {
            let e = per_signal
                .entry(s["signal"].as_str().unwrap().to_string())
                .or_default();
            e.0 += s["score"].as_f64().unwrap() / 200.0;
            e.1 += usize::from(s["level"] != "ok");
            e.2 += usize::from(s["level"] == "drift");
        }
        for w in st["history"].as_array().unwrap() {
            match w["level"].as_str().unwrap() {
                "warn" => warn_windows += 1,
                "drift" => drift_windows += 1,
                _ => {}
            }
        }
        let mut this = false;
        while let Ok(t) = rx.try_recv() {
            this |= t.to == Level::Drift;
        }
        fired += usize::from(this);
    }
    eprintln!(
        "200 trials × {windows} windows: {fired} fired, {drift_windows} windows at drift, {warn_windows} at warn"
    );
    eprintln!(
        "per signal, last window of each trial (mean score, trials at warn+, at drift): {per_signal:?}"
    );
    // Under 1% of 200 trials: at most one.
    assert!(fired <= 1, "{fired} of 200 in-distribution trials fired");
}

#[test]
fn a_shift_of_known_size_is_detected_within_k_windows_and_clears_after_k() {
    let cfg = DriftConfig::default();
    let k = cfg.consecutive as u64;
    // One reference σ of ln(prompt length) longer, on their own, and a
    // third of prompts in Cyrillic, on their own.
    let shifts = [
        (
            Traffic {
                len_mu: BASE.len_mu + 0.5,
                ..BASE
            },
            Signal::PromptLength,
        ),
        (
            Traffic {
                cyrillic: 0.33,
                ..BASE
            },
            Signal::PromptScript,
        ),
        (Traffic { lo: 500, ..BASE }, Signal::PromptTokens),
        (
            Traffic {
                entropy: BASE.entropy + 0.5,
                ..BASE
            },
            Signal::OutputEntropy,
        ),
    ];
    for (seed, (shifted, signal)) in shifts.into_iter().enumerate() {
        let (r, mut rx) = recorder(cfg.clone());
        let mut g = Gen::new(1000 + seed as u64);
        let now = Instant::now();
        g.window(
            &r,
            BASE,
            cfg.reference_requests + 5 * cfg.window_requests,
            now,
        );
        // Raw PSI on 200 requests against 500 sits near 0.06 by noise
        // alone, so a stretch at warn can happen; never drift.
        assert!(r.state() < Level::Drift, "{signal:?}: before the shift");
        let onset = r.status()["windows"].as_u64().unwrap();
        let mut detected = None;
        for w in 1..=k {
            g.window(&r, shifted, cfg.window_requests, now);
            if r.state() == Level::Drift {
                detected = Some(w);
                break;
            }
        }
        assert_eq!(
            detected,
            Some(k),
            "{signal:?}: drift after exactly K windows"
        );
        let t = std::iter::from_fn(|| rx.try_recv().ok())
            .find(|t| t.to == Level::Drift)
            .unwrap();
        assert_eq!(t.window_index, onset + k);
        assert!(
            t.signals
                .iter()
                .any(|s| s.signal == signal && s.level == Level::Drift && s.score >= s.threshold),
            "{signal:?} not among {:?}",
            t.signals
        );
        // The shift ends: the state clears after K clean windows, not before.
        for w in 1..=k {
            g.window(&r, BASE, cfg.window_requests, now);
            if w < k {
                assert_eq!(r.state(), Level::Drift, "{signal:?}: cleared after {w}");
            }
        }
        assert!(r.state() < Level::Drift, "{signal:?}: not cleared");
        let cleared = std::iter::from_fn(|| rx.try_recv().ok()).last().unwrap();
        assert_eq!(cleared.from, Level::Drift);
    }
}

#[test]
fn hysteresis_needs_k_consecutive_windows_each_way() {
    let mut h = Hysteresis::default();
    use Level::*;
    assert_eq!(h.step(Drift, 3), None);
    assert_eq!(h.step(Drift, 3), None);
    assert_eq!(h.step(Ok, 3), None);
    assert_eq!(h.step(Drift, 3), None);
    assert_eq!(h.step(Drift, 3), None);
    // Three drift windows in a row: warn was reached on the way.
    assert_eq!(h.step(Drift, 3), Some((Ok, Drift)));
    assert_eq!(h.step(Ok, 3), None);
    assert_eq!(h.step(Ok, 3), None);
    assert_eq!(h.step(Drift, 3), None);
    assert_eq!(h.step(Warn, 3), None);
    assert_eq!(h.step(Warn, 3), None);
    assert_eq!(h.step(Warn, 3), Some((Drift, Warn)));
    assert_eq!(h.step(Ok, 3), None);
    assert_eq!(h.step(Ok, 3), None);
    assert_eq!(h.step(Ok, 3), Some((Warn, Ok)));
    let mut h = Hysteresis::default();
    assert_eq!(h.step(Warn, 1), Some((Ok, Warn)));
    assert_eq!(h.step(Drift, 1), Some((Warn, Drift)));
}

#[test]
fn a_window_closes_by_time_once_it_holds_enough_requests() {
    let cfg = DriftConfig {
        reference_requests: 100,
        window_requests: 1000,
        window_secs: 10.0,
        min_window_requests: 20,
        ..Default::default()
    };
    let (r, _rx) = recorder(cfg);
    let mut g = Gen::new(7);
    let t0 = Instant::now();
    g.window(&r, BASE, 100, t0);
    assert_eq!(r.status()["reference"]["requests"], 100);
    g.window(&r, BASE, 10, t0);
    r.tick(t0 + Duration::from_secs(11));
    assert_eq!(
        r.status()["windows"],
        0,
        "too few requests: the window stays open"
    );
    g.window(&r, BASE, 10, t0);
    r.tick(t0 + Duration::from_secs(9));
    assert_eq!(r.status()["windows"], 0, "not yet due");
    r.tick(t0 + Duration::from_secs(11));
    assert_eq!(r.status()["windows"], 1);
    assert_eq!(r.status()["last_window"]["requests"], 20);
}

#[test]
fn a_reference_round_trips_and_one_built_from_prompts_judges_prompt_signals_only() {
    let (r, _rx) = recorder(DriftConfig {
        reference_requests: 50,
        window_requests: 50,
        ..Default::default()
    });
    let mut g = Gen::new(3);
    let now = Instant::now();
    for k in 0..3 {
        let pooled: Vec<f32> = (0..48).map(|i| ((i * (k + 2)) as f32).sin()).collect();
        r.record_prompt_embedding(&pooled);
    }
    g.window(&r, BASE, 50, now);
    let saved = r.take_unsaved_reference().unwrap();
    assert!(r.take_unsaved_reference().is_none(), "taken once");
    let back: Reference = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
    // serde_json reads floats back to within an ulp, not always exactly.
    assert!((back.frozen_at - saved.frozen_at).abs() < 1e-3);
    let back = Reference {
        frozen_at: saved.frozen_at,
        ..back
    };
    assert_eq!(back, saved);
    assert_eq!(back.requests, 50);
    assert_eq!(back.embeddings.len(), 3);

    let prompts: Vec<(Vec<u32>, TextProfile)> = (0..60)
        .map(|i| ((0..20 + i % 7).collect(), [80, 0, 2, 20, 0, 0, 0]))
        .collect();
    let from_file = Reference::from_prompts(
        prompts.iter().map(|(p, t)| (p.as_slice(), *t)),
        "file:held-out.jsonl",
    );
    let (r, _rx) = recorder(DriftConfig {
        window_requests: 50,
        ..Default::default()
    });
    r.set_reference(from_file, true);
    g.window(&r, BASE, 50, now);
    let st = r.status();
    let judged: Vec<&str> = st["last_window"]["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["signal"].as_str().unwrap())
        .collect();
    assert_eq!(judged, ["prompt_length", "prompt_tokens", "prompt_script"]);
}

#[test]
fn settings_merge_per_model_and_refuse_bad_values_by_name() {
    let s = DriftSettings::from_value(serde_json::json!({
        "window_requests": 100,
        "models": {"gemma": {"psi_drift": 0.5, "consecutive": 2}},
    }))
    .unwrap();
    let g = s.for_model("gemma").unwrap();
    assert_eq!(
        (g.window_requests, g.psi_drift, g.consecutive),
        (100, 0.5, 2)
    );
    assert_eq!(s.for_model("other").unwrap().psi_drift, 0.25);
    let e = DriftSettings::from_value(serde_json::json!({"psi_warn": 0.5})).unwrap_err();
    assert!(e.contains("psi_warn"), "{e}");
    let e =
        DriftSettings::from_value(serde_json::json!({"models": {"m": {"windw": 3}}})).unwrap_err();
    assert!(e.contains("drift.models.m") && e.contains("windw"), "{e}");
}

#[test]
fn admission_samples_at_the_configured_rates() {
    let (r, _rx) = recorder(DriftConfig {
        entropy_rate: 0.25,
        prompt_logprob_rate: 0.1,
        ..Default::default()
    });
    let a: Vec<Admission> = (0..1000).map(|_| r.admit()).collect();
    assert_eq!(a.iter().filter(|a| a.entropy).count(), 250);
    assert_eq!(a.iter().filter(|a| a.prompt_logprob).count(), 100);
    assert!(a.iter().all(|a| a.record));
}
