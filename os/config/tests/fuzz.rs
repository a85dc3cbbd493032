//! Property-based fuzzing of parsing, validation and patching: nothing panics, whatever the
//! input. The number of cases comes from KILN_FUZZ_CASES (scripts/test sets it).

#![allow(clippy::unwrap_used)] // test helpers fail loudly on purpose

mod common;

use kiln_config::{Mode, Patch, from_yaml, validate};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// YAML-ish text built from the tokens that matter to the parser.
fn yamlish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("machine:".to_owned()),
        Just("cluster:".to_owned()),
        Just("version: v1alpha1".to_owned()),
        Just("  type: worker".to_owned()),
        Just("  network:".to_owned()),
        Just("    interfaces:".to_owned()),
        Just("      - interface: eth0".to_owned()),
        Just("        addresses: [10.0.0.1/24]".to_owned()),
        Just("- {op: add, path: /a, value: 1}".to_owned()),
        Just("$patch: delete".to_owned()),
        Just("&a [*a]".to_owned()),
        Just("!!binary aGk=".to_owned()),
        "[ -~]{0,20}".prop_map(|s| s),
    ];
    proptest::collection::vec(token, 0..20).prop_map(|lines| lines.join("\n"))
}

/// A valid document with some lines dropped, duplicated or replaced.
fn mutated_document() -> impl Strategy<Value = String> {
    let base = common::controlplane_yaml();
    let n = base.lines().count();
    proptest::collection::vec((0..n, 0u8..3, "[ -~]{0,12}"), 0..6).prop_map(move |edits| {
        let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
        for (at, kind, text) in edits {
            let at = at % lines.len().max(1);
            match kind {
                0 if !lines.is_empty() => {
                    lines.remove(at);
                }
                1 => lines.insert(at, text),
                _ => {
                    if let Some(l) = lines.get_mut(at) {
                        let indent = l.len() - l.trim_start().len();
                        *l = format!("{}{}", " ".repeat(indent), text);
                    }
                }
            }
        }
        lines.join("\n")
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn parsing_arbitrary_text_never_panics(text in "\\PC{0,200}") {
        if let Ok(cfg) = from_yaml(&text) {
            for mode in Mode::ALL { let _ = validate(&cfg, mode); }
        }
    }

    #[test]
    fn parsing_yamlish_text_never_panics(text in yamlish()) {
        if let Ok(cfg) = from_yaml(&text) {
            for mode in Mode::ALL { let _ = validate(&cfg, mode); }
        }
        let _ = Patch::parse(&text, "fuzz");
    }

    #[test]
    fn mutated_documents_never_panic(text in mutated_document()) {
        if let Ok(cfg) = from_yaml(&text) {
            for mode in Mode::ALL { let _ = validate(&cfg, mode); }
        }
    }

    #[test]
    fn arbitrary_patches_never_panic(text in yamlish()) {
        if let Ok(patch) = Patch::parse(&text, "fuzz")
            && let Ok(cfg) = kiln_config::patch::apply(&common::worker(), &[patch])
        {
            let _ = validate(&cfg, Mode::Metal);
        }
    }

    #[test]
    fn json_patch_operations_never_panic(
        op in prop_oneof![Just("add"), Just("remove"), Just("replace"), Just("move"), Just("copy"), Just("test")],
        path in prop_oneof![Just("/machine/network/hostname".to_owned()), Just("/machine/-".to_owned()), Just("/cluster/network/podSubnets/0".to_owned()), "(/[a-z0-9~-]{0,6}){0,4}"],
        from in "(/[a-z]{0,6}){0,3}",
    ) {
        let text = format!(r#"[{{"op": "{op}", "path": "{path}", "from": "{from}", "value": "x"}}]"#);
        if let Ok(patch) = Patch::parse(&text, "fuzz") {
            let _ = kiln_config::patch::apply(&common::controlplane(), &[patch]);
        }
    }
}
