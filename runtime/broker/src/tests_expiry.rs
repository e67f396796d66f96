//! Producer and consumer-group lifetimes: concurrent epoch bumps, expiry that never removes
//! what is in use, releasing the server's producers.

use weir_core::{now_ms, TopicConfig};

use crate::tests_suite::Backend;
use crate::{BrokerError, Caller};

const DAY_MS: i64 = 24 * 3600 * 1000;

/// Concurrent InitProducer calls on one id (a restarted app and its zombie) each get their own
/// epoch: two with the same epoch would see each other's batches as duplicates and drop them.
async fn concurrent_epoch_bumps_never_issue_an_epoch_twice(backend: Backend) {
    let b = backend.broker();
    let (id, _) = b.init_producer(None, &Caller::default()).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let b = (*b).clone();
        tasks.push(tokio::spawn(async move {
            b.init_producer(Some(id), &Caller::default())
                .await
                .unwrap()
                .1
        }));
    }
    let mut epochs = Vec::new();
    for t in tasks {
        epochs.push(t.await.unwrap());
    }
    epochs.sort_unstable();
    assert_eq!(epochs, (1..=32).collect::<Vec<u32>>());
}

/// A group with an open subscription is in use however long it goes without committing (a
/// quiet topic); its idle time starts when the last subscriber leaves. A fetch of its offsets
/// by a client counts as use too.
async fn groups_in_use_do_not_expire(backend: Backend) {
    let b = backend.broker();
    b.create_topic(TopicConfig::new("t", 1)).await.unwrap();
    b.publish(crate::tests::to("t", 0, crate::tests::values(0..3)))
        .await
        .unwrap();
    b.commit_offsets("g", "t", vec![(0, 2)]).await.unwrap();
    let later = now_ms() + 8 * DAY_MS;
    let member = b.join_group("g", "t");
    assert_eq!(b.expire_idle(later).await.unwrap().1, 0, "subscribed");
    assert_eq!(b.fetch_offsets("g", "t").await.unwrap(), vec![(0, 2)]);
    drop(member);
    assert_eq!(
        b.expire_idle(now_ms() + 6 * DAY_MS).await.unwrap().1,
        0,
        "idle for less than the expiry since the subscriber left"
    );
    b.touch_group("g", "t");
    assert_eq!(b.expire_idle(now_ms() + 6 * DAY_MS).await.unwrap().1, 0);
    assert_eq!(b.expire_idle(later).await.unwrap().1, 1, "idle for 8 days");
    assert!(b.fetch_offsets("g", "t").await.unwrap().is_empty());
}

/// A removed plugin's producers are released: forgotten, like expired ones.
async fn released_server_producers_are_forgotten_and_clients_cannot_release_theirs(
    backend: Backend,
) {
    let b = backend.broker();
    let (server_id, _) = b.init_producer(None, &Caller::Server).await.unwrap();
    let (client_id, _) = b.init_producer(None, &Caller::default()).await.unwrap();
    b.release_server_producers(&[server_id, client_id])
        .await
        .unwrap();
    let e = b
        .init_producer(Some(server_id), &Caller::Server)
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::ProducerExpired { .. }), "{e}");
    // A client's producer is not the server's to release.
    b.init_producer(Some(client_id), &Caller::default())
        .await
        .unwrap();
}

on_both_stores!(
    concurrent_epoch_bumps_never_issue_an_epoch_twice,
    groups_in_use_do_not_expire,
    released_server_producers_are_forgotten_and_clients_cannot_release_theirs
);
