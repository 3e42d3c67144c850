//! `make bench`: figures, not assertions.
//!
//! 1. For grayscale and blur (sigma 2) on each Kodak photo: the component's
//!    time per image through the host (fresh store, instantiate, pixels in,
//!    filter, pixels out, checks), the same filter code compiled natively,
//!    and their ratio.
//! 2. The per-job sandbox overhead: fresh store + instantiate + call + drop
//!    on a 1x1 image, with the pooling allocator on and off.
//! 3. GIF encoding of a photo at the encoder's default quantizer speed (1)
//!    and at imgflow's `GIF_SPEED`.
//! 4. What the API's check of a submitted image costs: reading the header
//!    only (`codec::decode_cost`) against decoding it whole
//!    (`codec::validate`), on photos and on a decode bomb (8192x8192 16-bit
//!    zeros).
//!
//! 5. `libvips`: on kodim23 (768x512), blur at sigma 2, 8 and 50,
//!    grayscale, and a Lanczos3 resize to 320 wide and 4x up, through the
//!    host, natively, and libvips measured in the same
//!    run (`scripts/vips_bench.py`: one thread, decoded pixels in memory),
//!    with the ratios the performance goals are stated in.
//!
//! Each figure is the median of several runs after a warm-up. `BENCH_ONLY`
//! (`filters`, `libvips`, `overhead`, `gif` or `validate`) runs one section.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use image::{ImageEncoder as _, RgbaImage};
use imgflow_runtime::codec::{self, ImageLimits};
use imgflow_runtime::{Runtime, RuntimeConfig};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where `make plugins` leaves the components.
fn plugins_dir() -> PathBuf {
    repo().join("plugins/target/wasm32-wasip2/release")
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    std::hint::black_box(f());
    median(
        (0..runs)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(f());
                started.elapsed()
            })
            .collect(),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What every section uses: the executor, the runtime, the two plugins
/// with their parameters, the photos.
struct Bench {
    rt: tokio::runtime::Runtime,
    runtime: Runtime,
    grayscale: imgflow_runtime::Plugin,
    blur: imgflow_runtime::Plugin,
    no_params: imgflow_runtime::params::Params,
    sigma: imgflow_runtime::params::Params,
    photos: Vec<PathBuf>,
}

/// A section of the benchmark.
type Section = fn(&Bench);

fn main() {
    // Plugin calls are async (their deadline can abandon them anywhere); a
    // single-threaded executor drives them, as in the local runner.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let runtime = Runtime::new(RuntimeConfig::default()).expect("runtime");
    let grayscale = rt
        .block_on(runtime.load_file(&plugins_dir().join("grayscale.wasm")))
        .expect("make plugins first");
    let blur = rt
        .block_on(runtime.load_file(&plugins_dir().join("blur.wasm")))
        .expect("make plugins first");
    let no_params = grayscale.params_from_pairs([]).unwrap();
    let sigma = blur.params_from_pairs([("sigma", "2")]).unwrap();

    let mut photos: Vec<PathBuf> = std::fs::read_dir(repo().join("tests/fixtures/photos"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    photos.sort();

    let bench = Bench {
        rt,
        runtime,
        grayscale,
        blur,
        no_params,
        sigma,
        photos,
    };
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let sections: [(&str, Section); 5] = [
        ("filters", filters),
        ("libvips", libvips),
        ("overhead", overhead),
        ("validate", validate),
        ("gif", gif),
    ];
    for (name, section) in sections {
        if only.is_empty() || only == name {
            section(&bench);
        }
    }
}

/// The `filters` section.
fn filters(b: &Bench) {
    let Bench {
        rt,
        runtime,
        grayscale,
        blur,
        no_params,
        sigma,
        photos,
    } = b;
    println!("## Filters on the Kodak photos (median, ms per image)\n");
    println!("| photo | size | filter | component via host | native | ratio |");
    println!("|---|---|---|---:|---:|---:|");
    for path in photos.iter() {
        let bytes = std::fs::read(path).unwrap();
        let (image, _) = codec::decode(&bytes, &ImageLimits::default()).unwrap();
        let (w, h) = image.dimensions();
        let name = path.file_name().unwrap().to_string_lossy();

        let wasm = time(15, || {
            rt.block_on(runtime.apply(grayscale, image.clone(), no_params))
                .unwrap()
        });
        let native = time(15, || {
            let mut px = image.as_raw().clone();
            imgflow_filters::grayscale_in_place(&mut px);
            px
        });
        println!(
            "| {name} | {w}x{h} | grayscale | {:.2} | {:.2} | {:.2} |",
            ms(wasm),
            ms(native),
            wasm.as_secs_f64() / native.as_secs_f64()
        );

        let wasm = time(7, || {
            rt.block_on(runtime.apply(blur, image.clone(), sigma))
                .unwrap()
        });
        let native = time(7, || {
            imgflow_filters::gaussian_blur(w, h, image.as_raw(), 2.0).unwrap()
        });
        println!(
            "| {name} | {w}x{h} | blur sigma=2 | {:.2} | {:.2} | {:.2} |",
            ms(wasm),
            ms(native),
            wasm.as_secs_f64() / native.as_secs_f64()
        );
    }
}

/// The `libvips` section.
fn libvips(b: &Bench) {
    let Bench {
        rt,
        runtime,
        grayscale,
        blur,
        ..
    } = b;
    let resize = rt
        .block_on(runtime.load_file(&plugins_dir().join("resize.wasm")))
        .expect("make plugins first");
    libvips_side_by_side(rt, runtime, grayscale, blur, &resize);
}

/// The `overhead` section.
fn overhead(b: &Bench) {
    let Bench { rt, no_params, .. } = b;
    println!("\n## Per-job sandbox overhead (1x1 image through grayscale)\n");
    println!("| pooling allocator | median µs per job | mean µs per job (2000 jobs) |");
    println!("|---|---:|---:|");
    for pooling in [true, false] {
        let runtime = Runtime::new(RuntimeConfig {
            pooling,
            ..RuntimeConfig::default()
        })
        .unwrap();
        let plugin = rt
            .block_on(runtime.load_file(&plugins_dir().join("grayscale.wasm")))
            .unwrap();
        let pixel = RgbaImage::from_pixel(1, 1, image::Rgba([1, 2, 3, 4]));
        let job = || {
            rt.block_on(runtime.apply(&plugin, pixel.clone(), no_params))
                .unwrap()
        };
        let med = time(2000, job);
        let started = Instant::now();
        for _ in 0..2000 {
            std::hint::black_box(job());
        }
        let mean = started.elapsed() / 2000;
        println!(
            "| {} | {:.1} | {:.1} |",
            if pooling { "on" } else { "off" },
            med.as_secs_f64() * 1e6,
            mean.as_secs_f64() * 1e6
        );
    }
}

/// The `validate` section.
fn validate(b: &Bench) {
    let Bench { photos, .. } = b;
    println!("\n## Checking a submitted image: header only vs whole decode (median, ms)\n");
    println!("| image | file | decoded (what the decode holds) | header only | whole decode |");
    println!("|---|---:|---:|---:|---:|");
    let limits = ImageLimits::default();
    let mut inputs: Vec<(String, Vec<u8>)> = photos
        .iter()
        .take(2)
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(p).unwrap(),
            )
        })
        .collect();
    // The decode bomb the API's test uses: all zeros, zlib level 9.
    let mut bomb = Vec::new();
    let zeros = vec![0u8; 8192 * 8192 * 8];
    image::codecs::png::PngEncoder::new_with_quality(
        &mut bomb,
        image::codecs::png::CompressionType::Best,
        image::codecs::png::FilterType::NoFilter,
    )
    .write_image(&zeros, 8192, 8192, image::ExtendedColorType::Rgba16)
    .unwrap();
    drop(zeros);
    inputs.push(("bomb 8192x8192 16-bit".into(), bomb));
    for (name, bytes) in &inputs {
        let decoded = codec::decode_cost(bytes, &limits).unwrap().validate_bytes;
        let header = time(15, || codec::decode_cost(bytes, &limits).unwrap());
        let whole = time(3, || codec::validate(bytes, &limits).unwrap());
        println!(
            "| {name} | {} KiB | {:.1} MiB | {:.3} | {:.1} |",
            bytes.len() / 1024,
            decoded as f64 / (1024.0 * 1024.0),
            ms(header),
            ms(whole)
        );
    }
}

/// The `gif` section.
fn gif(b: &Bench) {
    let Bench { photos, .. } = b;
    println!("\n## GIF encoding (median of 3, ms per image)\n");
    println!(
        "| photo | size | quantizer speed 1 (encoder default) | speed {} (imgflow) | ratio |",
        codec::GIF_SPEED
    );
    println!("|---|---|---:|---:|---:|");
    for path in photos.iter().take(2) {
        let bytes = std::fs::read(path).unwrap();
        let (image, _) = codec::decode(&bytes, &ImageLimits::default()).unwrap();
        let (w, h) = image.dimensions();
        let at = |speed: i32| {
            time(3, || {
                let mut out = Vec::new();
                image::codecs::gif::GifEncoder::new_with_speed(&mut out, speed)
                    .encode(image.as_raw(), w, h, image::ExtendedColorType::Rgba8)
                    .unwrap();
                out
            })
        };
        let (slow, fast) = (at(1), at(codec::GIF_SPEED));
        let ours = time(3, || {
            codec::encode(&image, codec::ImageFormat::Gif).unwrap()
        });
        println!(
            "| {} | {w}x{h} | {:.0} | {:.0} (codec::encode: {:.0}) | {:.1} |",
            path.file_name().unwrap().to_string_lossy(),
            ms(slow),
            ms(fast),
            ms(ours),
            slow.as_secs_f64() / fast.as_secs_f64()
        );
    }
}

/// Section 5: imgflow's filters beside libvips's, on the performance goals'
/// photo, every figure measured in this run.
fn libvips_side_by_side(
    rt: &tokio::runtime::Runtime,
    runtime: &Runtime,
    grayscale: &imgflow_runtime::Plugin,
    blur: &imgflow_runtime::Plugin,
    resize: &imgflow_runtime::Plugin,
) {
    let path = repo().join("tests/fixtures/photos/kodim23.png");
    let bytes = std::fs::read(&path).unwrap();
    let (image, _) = codec::decode(&bytes, &ImageLimits::default()).unwrap();
    let (w, h) = image.dimensions();
    let vips = std::process::Command::new("python3")
        .arg(repo().join("scripts/vips_bench.py"))
        .arg(&path)
        .args(["2", "8", "50"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
    let vips_ms = |key: &str| vips.as_ref().and_then(|v| v[key].as_f64());
    println!("\n## imgflow beside libvips on kodim23.png ({w}x{h}; median, ms)\n");
    match &vips {
        Some(v) => println!(
            "libvips {} through pyvips, VIPS_CONCURRENCY=1, pixels in memory.\n",
            v["libvips_version"].as_str().unwrap_or("?")
        ),
        None => println!("libvips: not measured (run scripts/bench-deps.sh).\n"),
    }
    println!("| filter | component via host | native | libvips | component / libvips | component / native |");
    println!("|---|---:|---:|---:|---:|---:|");
    let row = |name: &str, wasm: Duration, native: Duration, vips: Option<f64>| {
        let (wasm, native) = (ms(wasm), ms(native));
        let (v, ratio) = match vips {
            Some(v) => (format!("{v:.2}"), format!("{:.2}", wasm / v)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {name} | {wasm:.2} | {native:.2} | {v} | {ratio} | {:.2} |",
            wasm / native
        );
    };
    for sigma in [2.0f64, 8.0, 50.0] {
        let params = blur
            .params_from_pairs([("sigma", sigma.to_string().as_str())])
            .unwrap();
        let wasm = time(9, || {
            rt.block_on(runtime.apply(blur, image.clone(), &params))
                .unwrap()
        });
        let native = time(9, || {
            imgflow_filters::gaussian_blur(w, h, image.as_raw(), sigma).unwrap()
        });
        row(
            &format!("blur sigma={sigma}"),
            wasm,
            native,
            vips_ms(&format!("blur_{sigma}")),
        );
    }
    let no_params = grayscale.params_from_pairs([]).unwrap();
    let wasm = time(15, || {
        rt.block_on(runtime.apply(grayscale, image.clone(), &no_params))
            .unwrap()
    });
    let native = time(15, || {
        let mut px = image.as_raw().clone();
        imgflow_filters::grayscale_in_place(&mut px);
        px
    });
    row("grayscale", wasm, native, vips_ms("grayscale"));
    // Lanczos3 both ways: down to 320 wide, and 4x up (libvips's `resize`
    // with the same kernel).
    for (label, width, key, runs) in [
        ("resize to 320 wide", 320u32, "resize_down", 15),
        ("resize 4x up", w * 4, "resize_up", 5),
    ] {
        let width_text = width.to_string();
        let params = resize
            .params_from_pairs([("width", width_text.as_str())])
            .unwrap();
        let wasm = time(runs, || {
            rt.block_on(runtime.apply(resize, image.clone(), &params))
                .unwrap()
        });
        let native = time(runs, || {
            imgflow_filters::resize(
                w,
                h,
                image.as_raw(),
                Some(width),
                None,
                imgflow_filters::Fit::Contain,
                imgflow_filters::Filter::Lanczos3,
            )
            .unwrap()
        });
        row(label, wasm, native, vips_ms(key));
    }
    if let (Some(g), Some(b)) = (vips_ms("job_grayscale"), vips_ms("job_blur_2")) {
        println!(
            "\nlibvips, a whole photo job (PNG bytes in, decode, filter, PNG bytes out), one thread: grayscale {g:.1} ms, blur sigma=2 {b:.1} ms, so {:.0} and {:.0} jobs/s on 2 cores (compare `make load`).",
            2000.0 / g,
            2000.0 / b
        );
    }
}
