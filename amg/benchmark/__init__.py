"""The benchmark layer under `pytest bench/`: profiles (plain data), the suite that measures a
case, the CSV schema, stored plans and attention records."""
