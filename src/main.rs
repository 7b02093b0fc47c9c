//! The `mailferry` command. Everything that knows about the terminal, clap and exit codes is in [`cli`].

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::parse();
    if let Err(err) = cli::init_logging(&args) {
        eprintln!("error: {err:#}");
        return cli::Exit::Error.into();
    }
    match cli::run(args) {
        Ok(code) => code.into(),
        Err(err) => {
            // A closed pipe (`mailferry status | head`) is not an error worth reporting.
            if err
                .chain()
                .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            cli::exit_for(&err).into()
        }
    }
}
