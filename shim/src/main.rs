//! `containerd-shim-cloister-v2`: containerd's shim v2 for pods in
//! microVMs. containerd-shim's `run` does the shim protocol; the only
//! thing decided here is the `start` of a containerd older than 2.0, which
//! needs a bare address and the task API v2 (see `compat`).

use cloister_shim::compat;
use cloister_shim::lifecycle::{shim_config, CloisterShim, RUNTIME_ID};

#[tokio::main]
async fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let Ok(flags) = containerd_shim::parse(&args) {
        if flags.action == "start" && compat::needs_task_api_v2(&flags.publish_binary) {
            match CloisterShim::start_legacy(&flags).await {
                Ok(address) => print!("{address}"),
                Err(e) => {
                    eprintln!("{RUNTIME_ID}: start: {e}");
                    #[allow(clippy::exit)]
                    std::process::exit(1);
                }
            }
            return;
        }
    }
    containerd_shim::asynchronous::run::<CloisterShim>(RUNTIME_ID, Some(shim_config())).await;
}
