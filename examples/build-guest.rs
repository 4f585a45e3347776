//! Builds a test guest from tests/guests/ and prints its path (used by scripts).
//! Usage: cargo run --example build-guest -- NAME [--bzimage]

#[path = "../tests/common/guests.rs"]
mod guests;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else {
        eprintln!("usage: build-guest NAME [--bzimage]");
        std::process::exit(2);
    };
    let path =
        if args.next().as_deref() == Some("--bzimage") { guests::build_bzimage(&name) } else { guests::build(&name) };
    println!("{}", path.display());
}
