//! Many clients at once: overload refused with Retry-After, hang-ups that free their blocks, and
//! the prefix cache.

mod util;

use std::time::{Duration, Instant};

use util::server::*;

/// 200 requests at once against a queue of 32: the excess is refused with 429 and Retry-After,
/// every admitted request runs to its end, and memory stays within the KV budget.
#[test]
fn overload_is_refused_with_retry_after_and_admitted_requests_complete() {
    let server = Server::start_with(&["--max-running", "8", "--max-queue", "32", "--kv-cache", "32MiB"]);
    let port = server.port;
    let clients = 200;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"model":"smollm2","prompt":"Request {i}: tell me about ships","max_tokens":8,"temperature":0,"ignore_eos":true,"stream":true}}"#
                );
                barrier.wait();
                stream_completion(port, &body)
            })
        })
        .collect();
    let results: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().expect("client thread")).collect();
    let (mut ok, mut refused) = (0, 0);
    for (status, raw) in &results {
        match status {
            200 => {
                assert!(raw.contains("data: [DONE]"), "an admitted request did not finish: {raw}");
                assert_eq!(raw.matches(r#""finish_reason":"length""#).count(), 1, "{raw}");
                ok += 1;
            }
            429 => {
                let lower = raw.to_ascii_lowercase();
                let retry = lower.lines().find_map(|l| l.strip_prefix("retry-after:")).map(str::trim);
                assert!(retry.and_then(|r| r.parse::<u64>().ok()).is_some_and(|s| s >= 1), "no Retry-After: {raw}");
                assert!(raw.contains(r#""code":"queue_full""#) && raw.contains("--max-queue"), "{raw}");
                refused += 1;
            }
            other => panic!("unexpected status {other}: {raw}\n--- server log\n{}", server.log()),
        }
    }
    eprintln!("overload: {ok} admitted and completed, {refused} refused with 429");
    assert_eq!(ok + refused, clients);
    assert!(ok >= 32, "at least the queue's worth of requests is admitted: {ok}");
    assert!(refused >= 100, "the excess is refused: {refused}");
    // The last answer's [DONE] can reach its client a step before the scheduler counts it out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while server.metric("berth:num_requests_running") != 0 {
        assert!(std::time::Instant::now() < deadline, "requests still counted running after every answer ended");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(server.metric("berth:num_requests_waiting"), 0);
    assert_eq!(server.metric_f64("berth:kv_cache_usage_perc"), 0.0);
    // The model (~100 MB mapped), a 32 MiB KV cache, and the server itself.
    let peak = server.peak_rss_kb();
    eprintln!("overload: peak resident memory {} MB", peak / 1024);
    assert!(peak > 0 && peak < 600 * 1024, "peak resident memory {peak} kB");
}

/// 32 streaming clients hang up mid-answer at once: their sequences stop and their blocks are free
/// within a few scheduler steps.
#[test]
fn thirty_two_clients_hanging_up_free_every_block() {
    let server = Server::start();
    let port = server.port;
    let clients = 32;
    let reading = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
    let hang_up = std::sync::Arc::new(std::sync::Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (reading, hang_up) = (reading.clone(), hang_up.clone());
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"model":"smollm2","prompt":"Story {i}: once upon a time","max_tokens":2000,"temperature":0,"ignore_eos":true,"stream":true}}"#
                );
                let mut s = send_completion(port, &body);
                read_events(&mut s, 2);
                reading.wait();
                hang_up.wait();
                drop(s);
            })
        })
        .collect();
    reading.wait();
    assert_eq!(server.metric("berth:num_requests_running"), clients as u64, "all 32 stream at once");
    let steps_before = server.metric("berth:engine_steps_total");
    let started = Instant::now();
    hang_up.wait();
    for t in threads {
        t.join().expect("client thread");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("berth:num_requests_running") > 0 || server.metric_f64("berth:kv_cache_usage_perc") > 0.0 {
        assert!(Instant::now() < deadline, "sequences kept running after their clients left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let steps = server.metric("berth:engine_steps_total") - steps_before;
    eprintln!("hang-ups: all blocks free {} ms and {steps} steps after 32 clients left", elapsed.as_millis());
    // Writing to a closed connection fails at the next token or the one after; the step after that
    // frees the blocks.
    assert!(steps <= 6, "{steps} steps ran after the clients left");
    assert_eq!(server.metric("berth:num_requests_waiting"), 0);
}

/// Two requests sharing a long prefix: the second reuses its cached blocks, and says so in its
/// usage (`prompt_tokens_details.cached_tokens`) and in the metrics.
#[test]
fn a_shared_prefix_is_served_from_the_cache() {
    let server = Server::start();
    let prefix = " hello".repeat(1000);
    let ask = |question: &str| {
        let body = format!(r#"{{"model":"smollm2","prompt":"{prefix}{question}","max_tokens":4,"temperature":0}}"#);
        // A 1,000-token prefill may take a while on a busy machine: a long read timeout.
        let (status, raw) = stream_completion(server.port, &body);
        assert_eq!(status, 200, "{raw}");
        serde_json::from_str::<serde_json::Value>(&body_of(raw.as_bytes())).expect("JSON")
    };
    let cold = ask(" Who are you?");
    let warm = ask(" Where are you?");
    let cached = |v: &serde_json::Value| v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
    assert_eq!(cached(&cold), 0, "{cold}");
    assert!(cached(&warm) >= 992, "the shared 1,000 tokens (62 full blocks) came from the cache: {warm}");
    assert!(server.metric("berth:prefix_cache_hits_total") >= 992);
    assert!(server.metric("berth:prefix_cache_queries_total") >= 2000);
}
