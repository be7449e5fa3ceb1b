print("pestod: not yet")
