//! Prints `docs/configuration.md`, the configuration reference, from the binaries' own
//! flag definitions: `cargo run -p tests --bin config-reference > docs/configuration.md`.

fn main() {
    print!("{}", tests::docs::configuration_reference());
}
