//! Prints the sizes of the delta methods for old/new file pairs (a measuring aid for docs/benchmark.md):
//! `cargo run --release --example delta-sizes OLD NEW [LEVEL...]`.
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (a, b) = (std::fs::read(&args[1]).unwrap(), std::fs::read(&args[2]).unwrap());
    let t = Instant::now();
    let raw = mailferry::delta::lines::diff(&a, &b);
    let frame = mailferry::delta::compress(&[], &raw, 19).unwrap();
    println!("lines: raw {} frame {} ({:.2} s)", raw.len(), frame.len(), t.elapsed().as_secs_f64());
    for l in args[3..].iter().map(|l| l.parse::<i32>().unwrap()) {
        let t = Instant::now();
        let f = mailferry::delta::compress(&a, &b, l).unwrap();
        println!("zstd-prefix -{l}: {} ({:.2} s)", f.len(), t.elapsed().as_secs_f64());
    }
}
