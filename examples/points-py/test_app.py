"""Native unit test of the plugin logic: no wasm, no server (python3 -m unittest)."""

import unittest

import weir_plugin as weir
from app import credit_points


def paid(order, user, amount):
    return weir.Record(value=f'{{"order":{order},"user":"{user}","amount":{amount}}}'.encode())


class CreditPoints(unittest.TestCase):
    def test_credits_floor_of_amount_times_rate_and_keeps_the_balance(self):
        state = weir.MemoryState()
        outputs = weir.run(credit_points, [paid(1, "ann", 12.5), paid(2, "ann", 7.9)], state, {"rate": "0.5"})
        self.assertEqual(state.get_json("balance/ann"), 6 + 3)
        self.assertEqual([o.topic for o in outputs], ["points.credited"] * 2)
        self.assertEqual(outputs[1].value, b'{"user":"ann","order":2,"points":3,"balance":9}')
        self.assertEqual(outputs[1].key, b"ann")

    def test_a_bad_record_is_an_error(self):
        with self.assertRaises(weir.PluginError):
            weir.run(credit_points, [weir.Record(value=b"not json")], weir.MemoryState())


if __name__ == "__main__":
    unittest.main()
