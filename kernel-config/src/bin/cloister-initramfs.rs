//! Packs a static binary as `/init` into a raw `newc` initramfs, with the
//! directories and device node an init needs before it mounts anything.
//!
//! ```text
//! cloister-initramfs --init target/.../cloister-test-init --out test-init.cpio \
//!     [--file SRC:/DST]... [--tree SRCDIR:/DST]...
//! ```

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use cloister_guest_image::cpio::Initramfs;
use cloister_guest_image::elf;

#[derive(Parser, Debug)]
#[command(about = "Pack a static binary as /init into a newc initramfs")]
struct Args {
    /// Statically linked x86-64 executable to run as /init (PID 1).
    #[arg(long, value_name = "PATH")]
    init: PathBuf,
    /// Where to write the archive (raw newc, uncompressed).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Extra file, copied with its permission bits: host path, then the
    /// absolute path inside the image. Repeatable.
    #[arg(long = "file", value_name = "SRC:DST")]
    files: Vec<String>,
    /// Extra directory tree (directories, regular files, symlinks as they
    /// are; anything else refused): host directory, then where it goes in
    /// the image. Repeatable. Used for a container rootfs in guest tests.
    #[arg(long = "tree", value_name = "SRCDIR:DST")]
    trees: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let image = build(&args)?;
    let bytes = image.to_bytes();
    // Write beside the target and rename, so a reader never sees half an archive.
    let partial = args.out.with_extension("cpio.partial");
    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(&partial, &bytes).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, &args.out)
        .with_context(|| format!("renaming {} to {}", partial.display(), args.out.display()))?;
    println!("{} ({} bytes)", args.out.display(), bytes.len());
    Ok(())
}

fn build(args: &Args) -> Result<Initramfs> {
    let init = fs::read(&args.init).with_context(|| format!("reading {}", args.init.display()))?;
    let interpreter = elf::interpreter(&init)
        .with_context(|| format!("{} cannot be /init", args.init.display()))?;
    if let Some(interpreter) = interpreter {
        bail!(
            "{} is dynamically linked (program interpreter {interpreter}); /init must be static: \
             build it with RUSTFLAGS='-C target-feature=+crt-static' and \
             --target x86_64-unknown-linux-gnu",
            args.init.display()
        );
    }

    let mut image = Initramfs::new();
    image
        .directory("/dev", 0o755)?
        // The kernel opens /dev/console for init's stdio before anything
        // could mount devtmpfs (it mounts it itself only without an initramfs).
        .char_device("/dev/console", 0o600, 5, 1)?
        .directory("/proc", 0o555)?
        .directory("/sys", 0o555)?
        .file("/init", 0o755, init)?;
    for spec in &args.files {
        let (source, target) = split_spec("--file", spec)?;
        add_file(&mut image, Path::new(source), target)?;
    }
    for spec in &args.trees {
        let (source, target) = split_spec("--tree", spec)?;
        add_tree(&mut image, Path::new(source), target.trim_end_matches('/'))?;
    }
    Ok(image)
}

fn split_spec<'a>(flag: &str, spec: &'a str) -> Result<(&'a str, &'a str)> {
    spec.rsplit_once(':')
        .filter(|(s, t)| !s.is_empty() && t.starts_with('/') && t.len() > 1)
        .with_context(|| format!("{flag} '{spec}' is not SRC:/ABSOLUTE/DST"))
}

/// Adds `source` as directory `target`, recursively, in name order so the
/// archive is the same on every run.
fn add_tree(image: &mut Initramfs, source: &Path, target: &str) -> Result<()> {
    let metadata =
        fs::symlink_metadata(source).with_context(|| format!("reading {}", source.display()))?;
    if !metadata.is_dir() {
        bail!("--tree source {} is not a directory", source.display());
    }
    image
        .directory(target, metadata.permissions().mode() & 0o7777)
        .with_context(|| format!("adding {} as {target}", source.display()))?;
    let mut entries = fs::read_dir(source)
        .with_context(|| format!("listing {}", source.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("listing {}", source.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name();
        let name = name
            .to_str()
            .with_context(|| format!("{} is not UTF-8", path.display()))?;
        let child = format!("{target}/{name}");
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        if kind.is_dir() {
            add_tree(image, &path, &child)?;
        } else if kind.is_symlink() {
            let link =
                fs::read_link(&path).with_context(|| format!("reading {}", path.display()))?;
            let link = link
                .to_str()
                .with_context(|| format!("symlink {} is not UTF-8", path.display()))?;
            image
                .symlink(&child, link)
                .with_context(|| format!("adding {} as {child}", path.display()))?;
        } else if kind.is_file() {
            add_file(image, &path, &child)?;
        } else {
            bail!(
                "{} is neither a directory, a file nor a symlink",
                path.display()
            );
        }
    }
    Ok(())
}

fn add_file(image: &mut Initramfs, source: &Path, target: &str) -> Result<()> {
    let metadata = fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    if !metadata.is_file() {
        bail!("--file source {} is not a regular file", source.display());
    }
    let contents = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
    let mode = metadata.permissions().mode() & 0o7777;
    image
        .file(target, mode, contents)
        .with_context(|| format!("adding {} as {target}", source.display()))?;
    Ok(())
}
