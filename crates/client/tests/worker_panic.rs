//! Regression (found in review): a handler panic noticed in the same poll as
//! a pending broker message made the worker's socket thread panic, and the
//! worker was gone for good.

use std::time::{Duration, Instant};

use majordome_client::{Bytes, Shutdown, Worker, WorkerOptions};

#[test]
fn regression_handler_panic_with_a_broker_message_pending_does_not_kill_the_worker() {
    let context = zmq::Context::new();
    let router = context.socket(zmq::ROUTER).unwrap();
    router.set_linger(0).unwrap();
    router.bind("tcp://127.0.0.1:*").unwrap();
    let endpoint = router.get_last_endpoint().unwrap().unwrap();
    let shutdown = Shutdown::new().unwrap();
    let stop = shutdown.clone();
    let options = WorkerOptions {
        heartbeat_interval: Duration::from_secs(10),
        liveness: 3,
        reconnect_delay: Duration::from_millis(100),
        ..WorkerOptions::default()
    };
    let worker = Worker::new(&endpoint, "svc", options);
    let thread = std::thread::spawn(move || worker.run(|_: Vec<Bytes>| -> Vec<Bytes> { panic!("handler bug") }, &stop));
    let identity = router.recv_multipart(0).unwrap()[0].clone();
    let request = vec![
        identity.clone(),
        vec![],
        b"MDPW01".to_vec(),
        vec![2],
        b"c".to_vec(),
        vec![],
        b"x".to_vec(),
    ];
    router.send_multipart(request, 0).unwrap();
    // Keep the worker's socket readable while the handler's panic arrives.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) && !thread.is_finished() {
        let heartbeat = vec![identity.clone(), vec![], b"MDPW01".to_vec(), vec![4]];
        let _ = router.send_multipart(heartbeat, zmq::DONTWAIT);
    }
    let died = thread.is_finished();
    shutdown.trigger();
    let joined = thread.join();
    assert!(!died, "the worker's socket thread died");
    assert!(matches!(joined, Ok(Ok(()))), "the worker stops cleanly");
}
