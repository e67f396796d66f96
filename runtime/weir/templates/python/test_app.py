"""Native unit test of the plugin: no wasm, no server (`python3 -m unittest`)."""

import unittest

import weir_plugin as weir
from app import count


class Count(unittest.TestCase):
    def test_counts_per_key(self):
        state = weir.MemoryState()
        records = [weir.Record(key=k.encode(), value=b"{}", offset=i) for i, k in enumerate(["ann", "bob", "ann"])]
        outputs = weir.run(count, records, state)
        self.assertEqual(len(outputs), 3)
        self.assertEqual(state.get_json("count/ann"), 2)
        self.assertEqual(outputs[2].json(), {"key": "ann", "count": 2})


if __name__ == "__main__":
    unittest.main()
