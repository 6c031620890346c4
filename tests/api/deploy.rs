//! The packaging stays valid: `deploy/relay.service` passes
//! `systemd-analyze verify`, with its `ExecStart` pointed at the relay this
//! build made (verify insists the program exists).

#[test]
fn the_systemd_unit_verifies() {
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/relay.service"))
            .expect("deploy/relay.service");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/relay "),
        "the unit starts /usr/local/bin/relay"
    );
    let dir = std::env::temp_dir().join(format!("relay-unit-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("relay.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/relay ",
            &format!("{} ", env!("CARGO_BIN_EXE_relay")),
        ),
    )
    .unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze is installed (Debian's systemd package)");
    let _ = std::fs::remove_dir_all(&dir);
    let said = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "systemd-analyze verify: {said}");
    assert!(
        !said.contains("relay.service"),
        "systemd-analyze had remarks on the unit: {said}"
    );
}
