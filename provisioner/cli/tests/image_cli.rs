//! `kiln image`: `build` writes an image into the store and prints its directory, a second
//! `build` with the same inputs finds it up to date, and `ls -o json` lists it.

use std::process::Command;

use anyhow::ensure;
use kiln_test_tiers::Tier;

fn kiln(args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "kiln {} failed: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn ls_on_an_empty_store_is_an_empty_list() -> anyhow::Result<()> {
    let store = tempfile::tempdir()?;
    let out = store.path().to_str().unwrap_or_default();
    let (json, _) = kiln(&["image", "ls", "--out", out, "-o", "json"])?;
    assert_eq!(json.trim(), "[]");
    let (table, _) = kiln(&["image", "ls", "--out", out])?;
    assert!(table.starts_with("VERSION"), "{table}");
    Ok(())
}

#[test]
fn build_then_build_again_is_up_to_date_and_listed() -> anyhow::Result<()> {
    kiln_test_tiers::skip_unless!(Tier::Kernel);
    let store = tempfile::tempdir()?;
    let out = store.path().to_str().unwrap_or_default();
    // Any dynamically linked program serves as /init here; booting is tested in kiln-image.
    let init = env!("CARGO_BIN_EXE_kiln");
    let args = [
        "image",
        "build",
        "--out",
        out,
        "--init",
        init,
        "--no-disk",
        "--no-installer",
        "--image-version",
        "test-1",
    ];
    let (dir, log) = kiln(&args)?;
    assert_eq!(
        dir.trim(),
        store.path().join("test-1").display().to_string()
    );
    assert!(log.contains("Packing the initramfs"), "{log}");
    let (_, log) = kiln(&args)?;
    assert!(log.contains("test-1 is up to date"), "{log}");

    let (json, _) = kiln(&["image", "ls", "--out", out, "-o", "json"])?;
    let images: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(images[0]["version"], "test-1");
    let outputs: Vec<&str> = images[0]["outputs"]
        .as_array()
        .map(|o| o.iter().filter_map(|o| o["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(outputs, ["vmlinux", "vmlinuz", "initramfs.zst"]);
    Ok(())
}
