//! The sandbox: each misbehaving test plugin ends with its own named error
//! within its limit, escapes are denied, and the same runtime then runs a
//! good job correctly. Also what `load` refuses, and the compiled-code cache.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use image::{Rgba, RgbaImage};
use imgflow_runtime::{CacheSecret, LoadError, Plugin, RunError, Runtime, RuntimeConfig};
use imgflow_testkit::block_on;

fn runtime(timeout: Duration, max_memory_mb: usize) -> Runtime {
    Runtime::new(RuntimeConfig {
        timeout,
        max_memory_bytes: max_memory_mb * 1024 * 1024,
        max_concurrent_jobs: 4,
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

fn load(runtime: &Runtime, name: &str) -> Plugin {
    block_on(runtime.load_file(&imgflow_testkit::plugin_path(name))).expect("plugin loads")
}

fn small_image() -> RgbaImage {
    RgbaImage::from_fn(4, 3, |x, y| Rgba([x as u8 * 60, y as u8 * 100, 200, 255]))
}

fn run(runtime: &Runtime, plugin: &Plugin, pairs: &[(&str, &str)]) -> Result<RgbaImage, RunError> {
    let params = plugin
        .params_from_pairs(pairs.iter().copied())
        .expect("params");
    block_on(runtime.apply(plugin, small_image(), &params)).map(|a| a.image)
}

/// After any failure, the same runtime still runs a good job correctly.
fn assert_still_works(runtime: &Runtime) {
    let gray = load(runtime, "grayscale");
    let out = run(runtime, &gray, &[]).expect("a good job after a bad one");
    let px = out.get_pixel(1, 1);
    // R=60, G=100, B=200: 0.2126*60 + 0.7152*100 + 0.0722*200 = 98.716 -> 99.
    assert_eq!(px.0, [99, 99, 99, 255]);
}

#[test]
fn an_endless_loop_times_out_within_the_limit_plus_one_second() {
    let limit = Duration::from_secs(2);
    let rt = runtime(limit, 128);
    let plugin = load(&rt, "spin");
    let started = Instant::now();
    let err = run(&rt, &plugin, &[]).unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err, RunError::Timeout { limit });
    assert_eq!(err.code().as_str(), "timeout");
    assert!(elapsed >= limit, "stopped early: {elapsed:?}");
    assert!(elapsed < limit + Duration::from_secs(1), "took {elapsed:?}");
    assert_still_works(&rt);
}

#[test]
fn a_plugin_blocked_in_a_host_call_times_out_within_the_limit_plus_one_second() {
    // `sleep` asks WASI to wait an hour: no WebAssembly runs, so only a
    // deadline around the whole call can end it.
    let limit = Duration::from_secs(2);
    let rt = runtime(limit, 128);
    let plugin = load(&rt, "sleep");
    let started = Instant::now();
    let err = run(&rt, &plugin, &[]).unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err, RunError::Timeout { limit });
    assert!(elapsed >= limit, "stopped early: {elapsed:?}");
    assert!(elapsed < limit + Duration::from_secs(1), "took {elapsed:?}");
    assert_still_works(&rt);
}

#[test]
fn a_metadata_call_that_sleeps_fails_to_load_within_the_limit_plus_one_second() {
    let limit = Duration::from_secs(2);
    let rt = runtime(limit, 128);
    for _ in 0..3 {
        let started = Instant::now();
        let err =
            block_on(rt.load_file(&imgflow_testkit::plugin_path("sleepy_metadata"))).unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(err.code().as_str(), "metadata_failed", "{err}");
        assert!(
            matches!(&err, LoadError::Metadata(RunError::Timeout { limit: l }) if *l == limit),
            "{err:?}"
        );
        assert!(elapsed < limit + Duration::from_secs(1), "took {elapsed:?}");
    }
    // Every sandbox slot it took was given back.
    assert_still_works(&rt);
}

#[test]
fn unbounded_allocation_is_out_of_memory() {
    let rt = runtime(Duration::from_secs(10), 64);
    let plugin = load(&rt, "hog");
    let err = run(&rt, &plugin, &[]).unwrap_err();
    assert_eq!(err.code().as_str(), "out_of_memory", "{err}");
    assert!(err.to_string().contains("64 MiB"), "{err}");
    assert_still_works(&rt);
}

/// `plugins/testing/two-memories`: a component of two core instances whose
/// `apply` grows each instance's memory to 40 MiB.
fn two_memories(rt: &Runtime) -> Plugin {
    let path = imgflow_testkit::repo().join("plugins/testing/two-memories/two_memories.wat");
    let wasm = wat::parse_file(&path).expect("two_memories.wat assembles");
    block_on(rt.load(&wasm)).expect("two-memories loads")
}

#[test]
fn the_memory_cap_is_the_sum_over_all_of_a_components_memories() {
    // Each memory alone (40 MiB) is under the 64 MiB cap; together they
    // are not: the second growth is stopped as out of memory.
    let rt = runtime(Duration::from_secs(10), 64);
    let plugin = two_memories(&rt);
    let err = run(&rt, &plugin, &[]).unwrap_err();
    assert_eq!(err.code().as_str(), "out_of_memory", "{err}");
    assert!(err.to_string().contains("in all"), "{err}");
    assert_still_works(&rt);

    // Under a cap that holds both, the plugin really grows both memories
    // and says so, so the refusal above is the sum at work.
    let roomy = runtime(Duration::from_secs(10), 100);
    let plugin = two_memories(&roomy);
    let err = run(&roomy, &plugin, &[]).unwrap_err();
    assert_eq!(
        err,
        RunError::PluginFailed("both memories grew to 40 MiB".into())
    );
}

#[test]
fn unbounded_recursion_is_a_trap_naming_the_stack_overflow() {
    let rt = runtime(Duration::from_secs(10), 128);
    let plugin = load(&rt, "recurse");
    let err = run(&rt, &plugin, &[]).unwrap_err();
    assert_eq!(err.code().as_str(), "trap", "{err}");
    assert!(err.to_string().contains("stack overflow"), "{err}");
    assert_still_works(&rt);
}

#[test]
fn a_panic_is_a_trap_carrying_the_plugins_message() {
    let rt = runtime(Duration::from_secs(10), 128);
    let plugin = load(&rt, "panicky");
    let err = run(&rt, &plugin, &[]).unwrap_err();
    assert_eq!(err.code().as_str(), "trap", "{err}");
    assert!(err.to_string().contains("panicked on purpose"), "{err}");
    assert_still_works(&rt);
}

#[test]
fn a_buffer_of_the_wrong_length_is_invalid_output() {
    let rt = runtime(Duration::from_secs(10), 128);
    let plugin = load(&rt, "bad_output");
    let err = run(&rt, &plugin, &[]).unwrap_err();
    assert_eq!(err.code().as_str(), "invalid_output", "{err}");
    assert!(err.to_string().contains("47 bytes"), "{err}");
    assert!(err.to_string().contains("48"), "{err}");
    assert_still_works(&rt);
}

#[test]
fn files_environment_and_network_are_denied() {
    let rt = runtime(Duration::from_secs(10), 128);
    let plugin = load(&rt, "escape");

    // A file that certainly exists and is readable by this process.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let err = run(
        &rt,
        &plugin,
        &[("probe", "file"), ("target", secret.to_str().unwrap())],
    )
    .unwrap_err();
    assert_eq!(err.code().as_str(), "plugin_failed", "{err}");
    assert!(err.to_string().contains("file access denied"), "{err}");

    // An environment variable the host process has.
    std::env::set_var("IMGFLOW_TEST_SECRET", "top secret");
    let err = run(
        &rt,
        &plugin,
        &[("probe", "env"), ("target", "IMGFLOW_TEST_SECRET")],
    )
    .unwrap_err();
    assert_eq!(err.code().as_str(), "plugin_failed", "{err}");
    assert!(err.to_string().contains("env access denied"), "{err}");
    assert!(err.to_string().contains("(0 variables visible)"), "{err}");

    // A TCP listener on loopback that must never see a connection.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let err = run(&rt, &plugin, &[("probe", "net"), ("target", &addr)]).unwrap_err();
    assert_eq!(err.code().as_str(), "plugin_failed", "{err}");
    assert!(err.to_string().contains("net access denied"), "{err}");
    assert!(
        listener.accept().is_err(),
        "the plugin reached the listener"
    );

    assert_still_works(&rt);
}

#[test]
fn each_job_gets_a_fresh_instance() {
    // Many jobs through one plugin: the pool's slots are reused, and every
    // result is the same, so no state survives a job.
    let rt = runtime(Duration::from_secs(10), 128);
    let plugin = load(&rt, "grayscale");
    let first = run(&rt, &plugin, &[]).unwrap();
    for _ in 0..50 {
        assert_eq!(run(&rt, &plugin, &[]).unwrap(), first);
    }
}

#[test]
fn a_job_finds_nothing_an_earlier_job_left_in_its_memory() {
    // One slot, so the second job runs in the first one's memory, reused:
    // restored in place (the pages the job touched, within the first
    // POOL_KEEP_RESIDENT_MB) or, beyond that, given back to the kernel.
    for keep_resident_mb in [0, 4, 16, 64] {
        let rt = Runtime::new(RuntimeConfig {
            timeout: Duration::from_secs(10),
            max_memory_bytes: 128 << 20,
            max_concurrent_jobs: 1,
            keep_resident_bytes: keep_resident_mb << 20,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let plugin = load(&rt, "residue");
        // The scan sees the pattern where it is: written in the same job.
        match run(&rt, &plugin, &[("mode", "both"), ("seed", "7")]) {
            Err(RunError::PluginFailed(message)) => assert!(message.contains("found"), "{message}"),
            other => panic!("the scan did not see its own job's pattern: {other:?}"),
        }
        for seed in ["11", "12"] {
            run(&rt, &plugin, &[("mode", "write"), ("seed", seed)]).expect("write");
            let scanned = run(&rt, &plugin, &[("mode", "scan"), ("seed", seed)]);
            assert!(
                scanned.is_ok(),
                "keep resident {keep_resident_mb} MiB: a job saw the earlier job's data: {scanned:?}"
            );
        }
    }
}

#[test]
fn load_refuses_what_is_not_a_filter_component() {
    let rt = runtime(Duration::from_secs(10), 128);
    let code = |r: Result<Plugin, LoadError>| r.map(|_| ()).unwrap_err();

    let e = code(block_on(rt.load(b"definitely not wasm")));
    assert_eq!(e.code().as_str(), "not_a_component", "{e}");

    let core = wat::parse_str("(module (func (export \"apply\")))").unwrap();
    let e = code(block_on(rt.load(&core)));
    assert_eq!(e.code().as_str(), "not_a_component", "{e}");
    assert!(e.to_string().contains("core WebAssembly module"), "{e}");

    let empty = wat::parse_str("(component)").unwrap();
    let e = code(block_on(rt.load(&empty)));
    assert_eq!(e.code().as_str(), "wrong_world", "{e}");

    let foreign = wat::parse_str(
        r#"(component (import "evil:host/launch-missiles" (instance (export "fire" (func)))))"#,
    )
    .unwrap();
    let e = code(block_on(rt.load(&foreign)));
    assert_eq!(e.code().as_str(), "forbidden_import", "{e}");
    assert!(e.to_string().contains("evil:host/launch-missiles"), "{e}");
}

fn secret(text: &str) -> Option<CacheSecret> {
    Some(text.parse().expect("a long enough secret"))
}

fn cache_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    entries
}

#[test]
fn compiled_code_is_cached_on_disk_by_digest() {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        cache_secret: secret("a test secret of some length"),
        max_concurrent_jobs: 2,
        ..RuntimeConfig::default()
    };
    let bytes = std::fs::read(imgflow_testkit::plugin_path("grayscale")).unwrap();
    let digest = {
        let rt = Runtime::new(config.clone()).unwrap();
        let plugin = block_on(rt.load(&bytes)).unwrap();
        plugin.digest().to_string()
    };
    let entries = cache_entries(dir.path());
    assert_eq!(entries.len(), 1, "{entries:?}");
    let name = entries[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(&digest) && name.ends_with(".cwasm"),
        "{entries:?}"
    );
    let written = std::fs::read(&entries[0]).unwrap();

    // A new runtime with the same secret (as after a restart) loads the
    // cached code, leaving the entry as it was, and runs it.
    let rt = Runtime::new(config.clone()).unwrap();
    let plugin = block_on(rt.load(&bytes)).unwrap();
    assert_eq!(
        run(&rt, &plugin, &[]).unwrap().get_pixel(1, 1).0,
        [99, 99, 99, 255]
    );
    assert_eq!(std::fs::read(&entries[0]).unwrap(), written, "a cache hit");

    // A damaged entry is discarded and replaced, not trusted.
    let path = &entries[0];
    std::fs::write(path, b"garbage").unwrap();
    let rt = Runtime::new(config.clone()).unwrap();
    let plugin = block_on(rt.load(&bytes)).unwrap();
    assert_eq!(
        run(&rt, &plugin, &[]).unwrap().get_pixel(1, 1).0,
        [99, 99, 99, 255]
    );
    assert!(std::fs::metadata(path).unwrap().len() > 1000);

    // An entry written under another secret is refused and rewritten.
    let other = RuntimeConfig {
        cache_secret: secret("another secret, not the same"),
        ..config.clone()
    };
    let rt = Runtime::new(other).unwrap();
    block_on(rt.load(&bytes)).unwrap();
    let rewritten = std::fs::read(path).unwrap();
    assert_ne!(rewritten, written, "refused and compiled again");

    // Without a secret there is no disk cache: nothing read or written.
    let rt = Runtime::new(RuntimeConfig {
        cache_secret: None,
        ..config
    })
    .unwrap();
    block_on(rt.load(&bytes)).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), rewritten);
    assert_eq!(cache_entries(dir.path()).len(), 1);
}

#[test]
fn another_plugins_code_under_this_plugins_cache_entry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        cache_secret: secret("the same secret for both plugins"),
        max_concurrent_jobs: 2,
        ..RuntimeConfig::default()
    };
    let gray_wasm = std::fs::read(imgflow_testkit::plugin_path("grayscale")).unwrap();
    let invert_wasm = std::fs::read(imgflow_testkit::plugin_path("invert")).unwrap();
    let (gray_digest, invert_digest) = {
        let rt = Runtime::new(config.clone()).unwrap();
        let gray = block_on(rt.load(&gray_wasm)).unwrap();
        let invert = block_on(rt.load(&invert_wasm)).unwrap();
        (gray.digest().to_string(), invert.digest().to_string())
    };
    let entry = |digest: &str| {
        cache_entries(dir.path())
            .into_iter()
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(digest))
            .expect("an entry")
    };
    // The attacker's move: invert's compiled code, tag and all, under
    // grayscale's name.
    let invert_entry = std::fs::read(entry(&invert_digest)).unwrap();
    std::fs::write(entry(&gray_digest), &invert_entry).unwrap();

    let rt = Runtime::new(config).unwrap();
    let plugin = block_on(rt.load(&gray_wasm)).unwrap();
    assert_eq!(plugin.metadata().name, "grayscale");
    // The job runs grayscale, not invert (which would give 195,155,55).
    assert_eq!(
        run(&rt, &plugin, &[]).unwrap().get_pixel(1, 1).0,
        [99, 99, 99, 255]
    );
    assert_ne!(
        std::fs::read(entry(&gray_digest)).unwrap(),
        invert_entry,
        "the forged entry was replaced"
    );
}

#[test]
fn metadata_is_read_at_load_time() {
    let rt = runtime(Duration::from_secs(10), 128);
    let plugin = load(&rt, "blur");
    let m = plugin.metadata();
    assert_eq!((m.name.as_str(), m.version.as_str()), ("blur", "0.1.0"));
    assert_eq!(plugin.digest().len(), 64);
}

#[test]
fn the_compiled_code_cache_evicts_the_least_recently_used_beyond_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let base = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        cache_secret: secret("the cache cap test secret"),
        max_concurrent_jobs: 2,
        ..RuntimeConfig::default()
    };
    let wasm = |name: &str| std::fs::read(imgflow_testkit::plugin_path(name)).unwrap();
    // Measure each entry in a scratch cache, then cap this one so that
    // grayscale and blur fit but not invert as well.
    let size = |name: &str| {
        let scratch = tempfile::tempdir().unwrap();
        let rt = Runtime::new(RuntimeConfig {
            cache_dir: Some(scratch.path().to_path_buf()),
            ..base.clone()
        })
        .unwrap();
        block_on(rt.load(&wasm(name))).unwrap();
        std::fs::metadata(&cache_entries(scratch.path())[0])
            .unwrap()
            .len()
    };
    let cap = size("grayscale") + size("blur") + size("invert") / 2;
    let config = RuntimeConfig {
        cache_max_bytes: cap,
        ..base
    };
    let rt = Runtime::new(config).unwrap();
    let gray = block_on(rt.load(&wasm("grayscale"))).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let invert = block_on(rt.load(&wasm("invert"))).unwrap();
    assert_eq!(cache_entries(dir.path()).len(), 2);
    assert_eq!(rt.cache_evictions(), 0);
    // Use grayscale again (a hit renews it): invert is now the oldest.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let again = Runtime::new(rt.config().clone()).unwrap();
    block_on(again.load(&wasm("grayscale"))).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // A third entry goes over the cap: the least recently used goes.
    block_on(rt.load(&wasm("blur"))).unwrap();
    let left: Vec<String> = cache_entries(dir.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().any(|n| n.starts_with(gray.digest())),
        "{left:?}"
    );
    assert!(
        !left.iter().any(|n| n.starts_with(invert.digest())),
        "{left:?}"
    );
    assert_eq!(rt.cache_evictions(), 1);
}
