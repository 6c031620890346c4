//! TLS: a client connects over wss:// to a server with a test certificate
//! signed by a test CA it trusts, and is refused without that trust.

use signal_relay::client::{Client, ConnectOptions};
use signal_relay::testing::spawn_app_with;

/// A test CA and a certificate for `localhost` it signed, in a directory
/// of their own (removed on drop).
pub struct TestCertificates {
    dir: std::path::PathBuf,
    pub ca_path: std::path::PathBuf,
    pub cert_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
}

impl TestCertificates {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("relay-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
        let certificates = TestCertificates {
            ca_path: dir.join("ca.pem"),
            cert_path: dir.join("server.pem"),
            key_path: dir.join("server-key.pem"),
            dir,
        };
        std::fs::write(&certificates.ca_path, ca.pem()).unwrap();
        std::fs::write(&certificates.cert_path, server_cert.pem()).unwrap();
        std::fs::write(&certificates.key_path, server_key.serialize_pem()).unwrap();
        certificates
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_test_certificate() {
    let certs = TestCertificates::new();
    let (ca_path, cert_path, key_path) = (&certs.ca_path, &certs.cert_path, &certs.key_path);

    let app = spawn_app_with(|c| {
        c.tls.tls_cert = Some(cert_path.clone());
        c.tls.tls_key = Some(key_path.clone());
    })
    .await;
    assert!(app.url.starts_with("wss://localhost:"));

    let options = ConnectOptions {
        ca_cert: Some(ca_path.clone()),
        ..ConnectOptions::default()
    };
    let (client, _events) = Client::connect_with(&app.url, options).await.unwrap();
    let auth = client.register("tls_user", "password123").await.unwrap();
    assert_eq!(
        client.who_am_i().await.unwrap().user_id.as_ref(),
        auth.user_id.as_bytes()
    );

    // Without the test CA, the certificate is not trusted.
    assert!(Client::connect(&app.url).await.is_err());
    // Plain ws:// to the TLS port does not upgrade.
    let plain = app.url.replacen("wss://", "ws://", 1);
    assert!(Client::connect(&plain).await.is_err());
}
