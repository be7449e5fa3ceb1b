print("pesto-loadgen: being written")
