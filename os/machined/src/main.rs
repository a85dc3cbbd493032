//! `machined`: the init of Kiln OS as its own binary (images run it as PID 1 or entrypoint).

use clap::Parser;

/// The init of Kiln OS.
#[derive(Debug, Parser)]
#[command(name = "machined", version)]
struct Cli {
    #[command(flatten)]
    args: kiln_machined::entry::Args,
}

fn main() {
    // The kernel starts /init with no `--platform` (and PID 1 re-executes itself with
    // `--platform metal`); a container's entrypoint, also PID 1, names `container`.
    let args: Vec<String> = std::env::args().collect();
    let platform = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--platform=")
            .map(str::to_owned)
            .or_else(|| (a == "--platform").then(|| args.get(i + 1).cloned().unwrap_or_default()))
    });
    if args.get(1).map(String::as_str) == Some(kiln_os_api::contract::HOLD_ARG) {
        // The lab's gateway container of a Docker Swarm cluster: no node, no slots.
        kiln_machined::platform::container::hold();
    }
    if platform.as_deref() == Some("container") {
        // Plays the bootloader: may replace this process with a slot's machined.
        kiln_machined::platform::container::bootloader(&args);
    }
    let metal = platform.as_deref().is_none_or(|p| p == "metal");
    let cli = if kiln_machined::platform::metal::is_pid1() && metal {
        // The kernel started us as /init: become the machine's init, and run the node in the
        // child PID 1 forks.
        Cli::parse_from(kiln_machined::platform::metal::init::pid1())
    } else {
        Cli::parse()
    };
    std::process::exit(kiln_machined::entry::run(cli.args));
}
