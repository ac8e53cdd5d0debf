//! The `llmops` command: everything is in the library ([`llmops::cli`]).

fn main() -> anyhow::Result<()> {
    llmops::cli::main()
}
