use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = tessera::cli::Cli::parse();
    if let Err(err) = tessera::cli::run(cli).await {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
