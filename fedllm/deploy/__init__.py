"""Running a recipe's federation across organisations, on a deployment runtime (Flower)."""
