//! The ACPI power button (QMP `system_powerdown`): the kernel's `button` driver reports it as
//! `KEY_POWER` on an input device named "Power Button", read here through evdev.

use std::io::Read as _;
use std::path::{Path, PathBuf};

/// `EV_KEY` (linux/input-event-codes.h).
const EV_KEY: u16 = 0x01;
/// `KEY_POWER`.
const KEY_POWER: u16 = 116;
/// `struct input_event` on 64-bit Linux: a timeval (16 bytes), type, code, value.
const EVENT_SIZE: usize = 24;

/// The event devices (`/dev/input/eventN`) whose name says they are a power button.
pub fn power_buttons(sys_input: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(sys_input) else {
        return vec![];
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("device/name"))
                .is_ok_and(|n| n.trim() == "Power Button")
        })
        .map(|e| Path::new("/dev/input").join(e.file_name()))
        .collect();
    out.sort();
    out
}

/// Whether `event` (one `struct input_event`) is a press of the power key.
pub fn is_power_press(event: &[u8; EVENT_SIZE]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

/// Calls `pressed` (on a thread per button) every time a power button is pressed. Returns how
/// many buttons it watches.
pub fn watch(pressed: impl Fn() + Send + Sync + 'static) -> usize {
    let pressed = std::sync::Arc::new(pressed);
    let buttons = power_buttons(Path::new("/sys/class/input"));
    for dev in &buttons {
        let Ok(mut f) = std::fs::File::open(dev) else {
            tracing::warn!(device = %dev.display(), "cannot open the power button");
            continue;
        };
        let pressed = pressed.clone();
        std::thread::spawn(move || {
            let mut ev = [0u8; EVENT_SIZE];
            while f.read_exact(&mut ev).is_ok() {
                if is_power_press(&ev) {
                    pressed();
                }
            }
        });
    }
    buttons.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; EVENT_SIZE] {
        let mut e = [0u8; EVENT_SIZE];
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_press_of_the_power_key_counts() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0)), "release");
        assert!(!is_power_press(&event(EV_KEY, 115, 1)), "another key");
        assert!(!is_power_press(&event(0, 0, 0)), "sync");
    }

    #[test]
    fn buttons_are_found_by_device_name() {
        let sys = tempfile::tempdir().unwrap();
        for (ev, name) in [("event0", "Power Button\n"), ("event1", "AT Keyboard\n")] {
            std::fs::create_dir_all(sys.path().join(ev).join("device")).unwrap();
            std::fs::write(sys.path().join(ev).join("device/name"), name).unwrap();
        }
        assert_eq!(
            power_buttons(sys.path()),
            vec![PathBuf::from("/dev/input/event0")]
        );
    }
}
